import scrapy


class NewsSpider(scrapy.Spider):
    """Reads every article linked from the demo site's front page; paywalled ones are paid."""

    name = "news"

    def __init__(self, site: str = "http://127.0.0.1:8402", **kwargs):
        super().__init__(**kwargs)
        self.start_urls = [site]

    def parse(self, response):
        yield from response.follow_all(css="a.article", callback=self.parse_article)

    def parse_article(self, response):
        yield {
            "url": response.url,
            "section": response.css("article::attr(data-section)").get(),
            "title": response.css("h1::text").get(),
        }
