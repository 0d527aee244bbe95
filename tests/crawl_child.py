"""A crawl in its own process, for tests that kill it: python -m tests.crawl_child URLS SETTINGS.
Prints its stats as JSON when it ends normally."""

from __future__ import annotations

import json
import sys

from scrapy.crawler import CrawlerProcess

from tests.conftest import UrlsSpider


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        urls = f.read().split()
    process = CrawlerProcess(
        {
            "TELNETCONSOLE_ENABLED": False,
            "ROBOTSTXT_OBEY": False,
            "LOG_LEVEL": "INFO",
            **json.loads(sys.argv[2]),
        }
    )
    crawler = process.create_crawler(UrlsSpider)
    process.crawl(crawler, urls=urls)
    process.start()
    stats = {k: v for k, v in crawler.stats.get_stats().items() if isinstance(v, (int, str))}
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
