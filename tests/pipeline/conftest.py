import pytest


@pytest.fixture(scope="module")
def texts(reviews):
    # long IMDB reviews (truncated at 128 tokens), short ones, an empty and a whitespace-only text
    return reviews[:14] + ["", "   ", "Fine."]
