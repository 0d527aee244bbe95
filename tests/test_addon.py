from scrapy.utils.test import get_crawler

from scrapy_x402 import Addon, X402DownloaderMiddleware, X402ReceiptMiddleware, X402Settlement


def components(settings):
    crawler = get_crawler(settings_dict={"ADDONS": {Addon: 500}, "X402_ENABLED": False, **settings})
    s = crawler.settings
    return (
        s.getdict("DOWNLOADER_MIDDLEWARES"),
        s.getdict("SPIDER_MIDDLEWARES"),
        s.getdict("EXTENSIONS"),
    )


def test_addon_enables_every_component_at_documented_priorities():
    downloader, spider, extensions = components({})
    assert downloader[X402DownloaderMiddleware] == 545
    assert spider[X402ReceiptMiddleware] == 800
    assert extensions[X402Settlement] == 0


def test_project_settings_win_over_the_addon():
    downloader, _, _ = components(
        {"DOWNLOADER_MIDDLEWARES": {"scrapy_x402.X402DownloaderMiddleware": 560}}
    )
    assert list(downloader.values()).count(545) == 0
    assert downloader["scrapy_x402.X402DownloaderMiddleware"] == 560
