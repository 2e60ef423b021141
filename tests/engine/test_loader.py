"""Loading streams: each checkpoint tensor is quantized and dropped as its layer completes,
so no second full-precision copy of the model ever exists."""

from __future__ import annotations

import weakref

import pytest

from engine import loader
from engine.config import QuantPolicy
from engine.models.llama import LlamaModel

pytestmark = pytest.mark.slow
BIG = 1 << 16  # elements: every linear weight of the default model is larger, no norm is


def test_at_most_one_fused_layer_of_float_weights_is_alive(default_source):
    reader = loader.open_gguf(default_source.path)
    cfg = loader.config_from_gguf(reader)
    model = LlamaModel(cfg, QuantPolicy.build("int4"), 256)
    refs, most_alive = [], 0

    def watched():
        nonlocal most_alive
        for name, w in loader.gguf_tensors(reader, cfg):
            if w.numel() >= BIG and "embed" not in name:
                refs.append(weakref.ref(w))
            most_alive = max(most_alive, sum(r() is not None for r in refs))
            yield name, w
            del w

    loader.load_weights(model, watched(), len(reader.tensors), progress=False)
    assert len(refs) == 30 * 7  # q, k, v, o, gate, up, down per layer
    # q and k wait for v; gate waits for up: never more than three float weights at once.
    assert most_alive <= 3
    assert sum(r() is not None for r in refs) == 0


def test_unknown_checkpoint_tensor_is_ignored_and_missing_one_is_an_error(default_source):
    from engine.errors import CheckpointError

    reader = loader.open_gguf(default_source.path)
    cfg = loader.config_from_gguf(reader)
    model = LlamaModel(cfg, QuantPolicy.build("int8"), 256)
    tensors = ((n, w) for n, w in loader.gguf_tensors(reader, cfg) if "layers.7.mlp.up_proj" not in n)
    with pytest.raises(CheckpointError, match="layers.7.mlp.gate_up_proj"):
        loader.load_weights(model, tensors, len(reader.tensors), progress=False)


def test_a_load_lets_the_parsed_file_go_unless_a_block_keeps_it(default_source, monkeypatch):
    """A parsed GGUF keeps the file mapped and an object per metadata field (hundreds of MB
    for the default model): after a load nothing holds it, while inside reader_cache() loads
    that follow each other parse the file once."""
    import gc

    import gguf

    from engine import build
    from engine.config import EngineConfig

    def live_readers() -> int:
        gc.collect()
        return sum(type(o) is gguf.GGUFReader for o in gc.get_objects())

    monkeypatch.setattr(loader, "_HOLDS", 0)  # the test session keeps a block open
    loader._reader.cache_clear()
    loaded = build.load(EngineConfig(model=str(default_source.path), quant="bf16",
                                     max_model_len=64), progress=False, prepare=False)
    assert loaded.model.config.num_layers == 30
    assert loader._reader.cache_info().currsize == 0 and live_readers() == 0

    with loader.reader_cache():
        first = loader.open_gguf(default_source.path)
        assert loader.open_gguf(default_source.path) is first  # parsed once
        with loader.reader_cache():  # blocks nest: the inner one's end keeps it
            pass
        assert loader.open_gguf(default_source.path) is first
        del first
    assert loader._reader.cache_info().currsize == 0 and live_readers() == 0
