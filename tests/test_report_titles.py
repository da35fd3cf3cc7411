"""Every report check reads in words wherever a person sees it (first page, checks table, summary), and every
hazard and regulatory row names checks that exist."""

from secure_fedkim.report.checks import CHECK_BY_NAME, CHECKS
from secure_fedkim.report.text import HAZARD_CHECKS, REGULATORY


def test_every_check_has_a_title_in_words():
    missing = [c.name for c in CHECKS if not c.title.strip()]
    assert missing == []


def test_hazards_and_regulatory_rows_name_registered_checks():
    named = {n for _, names, _ in HAZARD_CHECKS for n in names}
    named |= {n for *_, names, _ in REGULATORY for n in names if not n.startswith("*")}
    assert named - set(CHECK_BY_NAME) == set()
