"""Decode parity of every WuNeng fusion mode (``full`` with the attention-value state is covered by
``test_decode.py``): prefill + decode steps == the model's full forward, float32, max |Δlogit| <= 1e-4."""

from __future__ import annotations

import pytest
from decode_support import check_decode_parity, make_model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(fusion="concat"),
        dict(fusion="add"),
        dict(fusion="gate"),
        dict(fusion="full", state_value="attention_output", state_query=False),
    ],
    ids=["concat", "add", "gate", "full-attention_output"],
)
def test_wuneng_fusion_modes_decode(overrides):
    """Every fusion mode (``full`` with the attention-value state is the family test above). One hybrid
    layer; the recurrence runs the sequential kernel here (the chunked prefill is covered above)."""
    model = make_model("wuneng", seed=2, num_layers=1, hybrid_layers="all", wkv_impl="reference", **overrides)
    check_decode_parity(model, prompt_lens=(5,), n_cont=2, extend_chunk=0, seed=1)
