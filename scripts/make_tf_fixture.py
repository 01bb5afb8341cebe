"""Make tests/fixtures/openai-tiny: a tiny GPT-2 saved the way OpenAI released GPT-2.

Run once, with TensorFlow, in a throw-away environment (gpt2kit itself never needs TensorFlow):

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python scripts/make_tf_fixture.py tests/fixtures/openai-tiny

It writes hparams.json, checkpoint, model.ckpt.index and model.ckpt.data-00000-of-00001 with
OpenAI's variable names and shapes (openai/gpt-2 src/model.py: conv1d weights are [1, nx, nf],
LayerNorm g/b), through TensorFlow's own Saver, and reference.npz holding the same values, so that
tests can check that gpt2kit's TensorFlow-free reader returns exactly what TensorFlow stored.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import tensorflow as tf

HPARAMS = {"n_vocab": 37, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}


def variables(h: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    C = h["n_embd"]

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    v = {"model/wte": normal(h["n_vocab"], C), "model/wpe": normal(h["n_ctx"], C)}
    for i in range(h["n_layer"]):
        p = f"model/h{i}/"
        for ln in ("ln_1", "ln_2"):
            v[p + ln + "/g"] = 1 + normal(C)
            v[p + ln + "/b"] = normal(C)
        for name, nx, nf in (("attn/c_attn", C, 3 * C), ("attn/c_proj", C, C), ("mlp/c_fc", C, 4 * C),
                             ("mlp/c_proj", 4 * C, C)):
            v[p + name + "/w"] = normal(1, nx, nf)
            v[p + name + "/b"] = normal(nf)
    v["model/ln_f/g"] = 1 + normal(C)
    v["model/ln_f/b"] = normal(C)
    return v


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    values = variables(HPARAMS, np.random.default_rng(2019))
    tf.compat.v1.disable_eager_execution()
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = {name: tf.compat.v1.get_variable(name, initializer=tf.constant(a)) for name, a in values.items()}
        saver = tf.compat.v1.train.Saver(var_list=tf_vars)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, os.path.join(out, "model.ckpt"), write_meta_graph=False)
    with open(os.path.join(out, "hparams.json"), "w") as f:
        json.dump(HPARAMS, f, indent=2)
    np.savez(os.path.join(out, "reference.npz"), **{k.replace("/", "."): a for k, a in values.items()})
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/openai-tiny")
