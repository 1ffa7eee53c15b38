"""The Gini plugin proves itself with probekit's conformance kit: every check is one pytest case."""

from probekit_gini.metric import AttentionGini

from probekit.testing import parametrize_with_checks


@parametrize_with_checks([AttentionGini(), AttentionGini(keys="all")])
def test_probekit_conformance(obj, check):
    check(obj)
