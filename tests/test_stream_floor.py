"""benchmarks/stream_floor.py's layout of a decode step's memory-bound reads, on the meta model (CPU)."""
import importlib.util
from pathlib import Path

import pytest

from modelyard import testing

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stream_floor.py"
_spec = importlib.util.spec_from_file_location("stream_floor", _PATH)
stream_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stream_floor)


@pytest.mark.parametrize("arch", ["llava", "llava-qwen2"])
def test_step_reads_cover_the_weights_floor_in_step_order(arch, tmp_path):
    from benchmarks.throughput import decode_weight_bytes
    model = stream_floor.meta_model(testing.make_checkpoint(arch, tmp_path / arch))
    lm = model.language_model
    spec = lm.spec
    reads = stream_floor.step_reads(model, batch=3, context=5)
    per_layer = [name.split(".", 1)[1] for name, *_ in reads if name.startswith("layer0.")]
    assert per_layer == ["self_attn.qkv_proj", "kv", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert len(reads) == 5 * spec.num_layers + 1 and reads[-1][0] == "lm_head"
    kv = [n for name, n, shape, _ in reads if shape is None]
    assert kv == [3 * 5 * 2 * spec.num_kv_heads * spec.head_dim * 2] * spec.num_layers
    # the GEMM weights are the floor's bytes but for the vectors (norm weights, biases), read by no GEMM kernel
    vectors = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                  if p.dim() == 1 and not n.startswith("embed_tokens"))
    assert sum(n for _, n, shape, _ in reads if shape is not None) == decode_weight_bytes(model) - vectors
    # the residual-adding projections are marked where the engine folds the norms (llama: yes; qwen2 with qkv bias: no)
    adds = {name.split(".")[-1] for name, _, _, add in reads if add}
    assert adds == ({"o_proj", "down_proj"} if arch == "llava" else set())
