"""InterFormer: summary token counts, CLS prepending, sequence merging and recent-token selection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctr.models.interformer import SequenceMaskNet, merge_sequences, most_recent
from ctr.model_io import ModelInputs
from models_testlib import BATCH, host_init, make_inputs, tiny_model

DIM = 8


def param_shapes(model, inputs):
    return jax.tree.map(lambda x: x.shape, jax.eval_shape(model.init, jax.random.key(0), inputs)["params"])


def test_summary_token_counts_follow_the_config():
    # The paper's tokens only (the target tokens are counted in test_target_attention_...).
    model = tiny_model("interformer", num_cls=3, num_pma=1, num_recent=2, num_layers=2, target_attention=False)
    inputs = make_inputs()
    variables = host_init(model, inputs)
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, inputs)
    sown = state["intermediates"]
    for i in range(3):  # one cross arch per block, plus the final one for the head
        (x_sum,) = sown[f"x_summary_{i}"]["x_sum"]
        assert x_sum.shape == (BATCH, 3, DIM)
        (cls,), (pma,), (recent,) = (sown[f"s_summary_{i}"][k] for k in ("cls_tokens", "pma_tokens", "recent_tokens"))
        assert (cls.shape, pma.shape, recent.shape) == ((BATCH, 3, DIM), (BATCH, 1, DIM), (BATCH, 2, DIM))
        assert sown[f"s_summary_{i}"]["s_sum"][0].shape == (BATCH, 3 + 1 + 2, DIM)
    # The CLS tokens are the first non-sequence summary, prepended before the first block.
    np.testing.assert_array_equal(sown["s_summary_0"]["cls_tokens"][0], sown["x_summary_0"]["x_sum"][0])
    # The head reads [X_sum || S_sum] of the final cross arch.
    shapes = param_shapes(model, inputs)
    assert shapes["head"]["dense_0"]["kernel"] == ((3 + 3 + 1 + 2) * DIM, 16)
    assert shapes["s_summary_0"]["pma"]["queries"] == (1, DIM)


@pytest.mark.parametrize("num_pma,num_recent", [(0, 2), (2, 0), (0, 0)])
def test_pma_and_recent_tokens_can_be_removed(num_pma, num_recent):
    model = tiny_model("interformer", num_cls=4, num_pma=num_pma, num_recent=num_recent, target_attention=False)
    shapes = param_shapes(model, make_inputs())
    assert ("pma" in shapes["s_summary_0"]) == bool(num_pma)
    tokens = 4 + num_pma + num_recent
    assert shapes["s_summary_0"]["gate"]["gate"]["kernel"] == (tokens * DIM, tokens * DIM)
    assert shapes["head"]["dense_0"]["kernel"] == ((4 + tokens) * DIM, 16)


def test_without_sequences_the_head_reads_the_non_sequence_summary():
    shapes = param_shapes(tiny_model("interformer", num_cls=4), make_inputs(sequences=False))
    assert not [k for k in shapes if k.startswith(("s_summary", "sequence", "masknet"))]
    assert shapes["head"]["dense_0"]["kernel"] == (4 * DIM, 16)
    # The interaction arch sees only the feature tokens: dense token + 3 features.
    assert shapes["interaction_0"]["lce"] == (4, 4)


def test_target_attention_adds_one_token_per_non_sequence_token():
    model = tiny_model("interformer", num_cls=4, num_pma=2, num_recent=2, target_attention=True)
    inputs = make_inputs()  # dense token + 3 features: 4 queries
    variables = host_init(model, inputs)
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, inputs)
    sown = state["intermediates"]["s_summary_0"]
    assert sown["target_tokens"][0].shape == (BATCH, 4, DIM)
    assert sown["s_sum"][0].shape == (BATCH, 4 + 2 + 2 + 4, DIM)
    assert param_shapes(model, inputs)["head"]["dense_0"]["kernel"] == ((4 + 12) * DIM, 16)


def test_features_of_other_widths_are_projected_to_the_token_width():
    shapes = param_shapes(tiny_model("interformer"), make_inputs(feature_dims=(8, 8, 4)))
    assert shapes["tokens"]["proj_f2"]["kernel"] == (4, DIM)
    assert "proj_f0" not in shapes["tokens"]
    assert shapes["tokens"]["dense_proj"]["kernel"] == (3, DIM)


def test_most_recent_picks_the_last_real_events_in_any_padding_layout():
    seq = jnp.arange(1.0, 6.0)[None, :, None] * jnp.ones((3, 5, 2))
    mask = jnp.array(
        [
            [False, False, True, True, True],  # left padded: most recent is position 4
            [True, True, True, False, False],  # right padded: most recent is position 2
            [False, False, False, False, True],  # one event: the second recent token is zero
        ]
    )
    recent = most_recent(seq, mask, 2)[..., 0]
    np.testing.assert_array_equal(recent, [[5.0, 4.0], [3.0, 2.0], [5.0, 0.0]])


def test_merge_sequences_concatenates_per_position_and_aligns_the_most_recent():
    a = jnp.ones((2, 4, 3))
    b = 2 * jnp.ones((2, 2, 5))
    mask_a = jnp.array([[False, True, True, True], [False, False, False, True]])
    mask_b = jnp.array([[True, True], [False, True]])
    inputs = ModelInputs(features={}, dense=None, sequences={"a": a, "b": b}, masks={"a": mask_a, "b": mask_b})
    merged, mask = merge_sequences(inputs)
    assert merged.shape == (2, 4, 8)
    np.testing.assert_array_equal(merged[0, :, 3:].sum(-1), [0, 0, 10, 10])  # b left-padded to length 4
    np.testing.assert_array_equal(merged[1, :, :3].sum(-1), [0, 0, 0, 3])  # a's padding is zeroed
    np.testing.assert_array_equal(merged[1, :, 3:].sum(-1), [0, 0, 0, 10])
    np.testing.assert_array_equal(mask, [[False, True, True, True], [False, False, False, True]])


def test_masknet_starts_near_the_sum_of_the_sequences():
    """So merged events start comparable with the target item's embedding (see SequenceMaskNet)."""
    layer = SequenceMaskNet(DIM, widths=(DIM, DIM))
    params = layer.init(jax.random.key(0), jnp.ones((1, 2, 2 * DIM)))["params"]
    np.testing.assert_array_equal(params["mask_out"]["bias"], np.ones(2 * DIM))
    np.testing.assert_array_equal(params["lce"]["kernel"], np.vstack([np.eye(DIM)] * 2))
    # Narrower sequences are tiled to DIM, as FeatureTokens(aligned_projections=True) starts their item features.
    mixed = SequenceMaskNet(DIM, widths=(DIM, 4, 4)).init(jax.random.key(0), jnp.ones((1, 2, DIM + 8)))
    tile = np.hstack([np.eye(4), np.eye(4)])
    np.testing.assert_array_equal(mixed["params"]["lce"]["kernel"], np.vstack([np.eye(DIM), tile, tile]))
