"""The sample-span feature (a layer wider than its batch restricted to the span of its samples) as one
module, reached from its old homes."""

from __future__ import annotations

import torch

from fisherlab import approximations, sample_span
from fisherlab.fisher import ExactBlock
from tests.cases import plain_factors, rng


def test_the_sample_span_feature_is_one_module_reached_from_its_old_homes() -> None:
    """fisherlab.sample_span holds the feature; ExactBlock's methods delegate to it and the old import paths
    (approximations.SpanMatrix, restricted_warm_starts) name the same objects."""
    block = ExactBlock(plain_factors(rng(3), 3, 1, 13, 20))
    span, direct = block.sample_span(), sample_span.restrict(block)
    assert span is not None and direct is not None and isinstance(span, sample_span.SampleSpan)
    assert (span.block.d_out, span.block.d_in, span.zeros) == (3, 3, 20 * 13 - 9)
    torch.testing.assert_close(span.block.as_dense(), direct.block.as_dense())
    assert approximations.SpanMatrix is sample_span.SpanMatrix
    assert approximations.restricted_warm_starts is sample_span.restricted_warm_starts
