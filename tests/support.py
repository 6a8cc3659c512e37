"""Helpers the tests share."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mnist_serving.server.launcher import ServerProcess

__all__ = ["Samples", "ServerProcess", "scrape"]

# Every sample of a /metrics page, keyed by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerProcess) -> Samples:
    """The server's /metrics, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
