"""Latents in store order (distdrgn.encode): float32 whatever the training precision."""

import numpy as np
import torch

from distdrgn.config import ModelConfig
from distdrgn.encode import encode_segment, gather_segments
from distdrgn.model import build_model
from distdrgn.objective import Preprocess
from distdrgn.store import ParticleStore


def test_latents_are_float32_under_bf16_training_and_segments_give_store_order(small_dataset):
    store = ParticleStore.open(small_dataset["store"])
    model = build_model(ModelConfig(zdim=2, enc_dim=16, enc_layers=1, dec_dim=16, dec_layers=1), store.D, seed=0)
    prep = Preprocess(store.D)
    fp32, _ = encode_segment(model, prep, store, batch_size=40)
    bf16, _ = encode_segment(model, prep, store, batch_size=40, amp_dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and torch.equal(fp32, bf16)  # no autocast rounding in z.N.pkl
    with torch.no_grad():  # the same as the encoder on all images at once
        from distdrgn.loader import Metadata
        from distdrgn.objective import prepare_targets

        batch = Metadata.from_store(store).batch(torch.arange(store.n), torch.from_numpy(store.images(np.arange(store.n))))
        want, _ = model.encode(prepare_targets(batch, prep, model.lattice).y_enc)
    torch.testing.assert_close(fp32, want, rtol=1e-5, atol=1e-6)
    # two ranks' contiguous segments, concatenated in rank order, are the store order
    parts = [encode_segment(model, prep, store, batch_size=7, rank=r, world_size=2)[0] for r in (0, 1)]
    assert [len(p) for p in parts] == [store.n // 2, store.n - store.n // 2]
    torch.testing.assert_close(torch.cat(parts), fp32, rtol=1e-4, atol=1e-4)  # other batch sizes: other sums
    mu, logvar = gather_segments(fp32, fp32, store.n, 1)
    assert mu.shape == (store.n, 2) and mu.dtype == np.float32
