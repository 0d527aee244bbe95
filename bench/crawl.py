"""Child of bench/throughput.py: one crawl of the given URLs; prints pages, seconds, stats.

python -m bench.crawl URLS_FILE SETTINGS_JSON
"""

from __future__ import annotations

import json
import sys

from scrapy import Spider
from scrapy.crawler import CrawlerProcess


class Pages(Spider):
    name = "pages"

    def __init__(self, urls_file: str, **kwargs):
        super().__init__(**kwargs)
        with open(urls_file, encoding="utf-8") as f:
            self.start_urls = f.read().split()

    def parse(self, response):
        yield {"url": response.url}


# What every benchmark crawl uses: 32 requests in flight, nothing else in the way.
CRAWL_SETTINGS = {
    "CONCURRENT_REQUESTS": 32,
    "CONCURRENT_REQUESTS_PER_DOMAIN": 32,
    "ROBOTSTXT_OBEY": False,
    "TELNETCONSOLE_ENABLED": False,
    "LOG_LEVEL": "WARNING",
    "COOKIES_ENABLED": False,
}


def main() -> None:
    settings = {**CRAWL_SETTINGS, **json.loads(sys.argv[2])}
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(Pages)
    process.crawl(crawler, urls_file=sys.argv[1])
    process.start()
    stats = crawler.stats.get_stats()
    seconds = (stats["finish_time"] - stats["start_time"]).total_seconds()
    print(
        json.dumps(
            {
                "items": stats.get("item_scraped_count", 0),
                "seconds": seconds,
                "paid": stats.get("x402/payment_count", 0),
                "preauthorized": stats.get("x402/preauthorized", 0),
                "settled": stats.get("x402/settled_payment_count", 0),
            }
        )
    )


if __name__ == "__main__":
    main()
