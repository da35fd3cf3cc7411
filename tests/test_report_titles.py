"""Every report check reads in words wherever a person sees it (first page, checks table, summary)."""

from secure_fedkim.report.build import CHECKS
from secure_fedkim.report.text import CHECK_TITLES


def test_every_check_has_a_title_in_words():
    missing = [name for name, _, _ in CHECKS if name not in CHECK_TITLES]
    assert missing == []
