"""Writes tiny Llama checkpoints and runs real mergekit on them, to make the parity fixtures of tests/test_config.py.

    bash experiments/peers/mergekit_venv.sh /tmp/mkvenv
    PYTHONPATH=$PWD python experiments/peers/make_mergekit_fixtures.py --mergekit /tmp/mkvenv/bin/mergekit-yaml

Writes tests/fixtures/mergekit/{inputs/<model>/, configs/<case>.yaml, outputs/<case>.safetensors}: the inputs are
float32 (hidden size 8, one layer, vocabulary 16; about 4 KB each), the outputs are the tensors mergekit-yaml wrote
(re-packed into one file each, bit for bit). mergekit runs offline (HF_HUB_OFFLINE=1) on the local directories.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from mergejax.convert.io import open_checkpoint, write_safetensors

ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "mergekit"
HIDDEN, INTER, VOCAB, LAYERS = 8, 16, 16, 1

CASES = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "./inputs/a", "parameters": {"weight": 0.6}}, {"model": "./inputs/b", "parameters": {"weight": 0.4}}]},
    "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": "./inputs/a", "parameters": {"weight": 0.7}}, {"model": "./inputs/b", "parameters": {"weight": 0.5}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "./inputs/base", "parameters": {"lambda": 0.8},
                        "models": [{"model": "./inputs/a", "parameters": {"weight": 1.0}},
                                   {"model": "./inputs/b", "parameters": {"weight": 0.5}}]},
    "ties": {"merge_method": "ties", "base_model": "./inputs/base", "parameters": {"int8_mask": True},
             "models": [{"model": "./inputs/a", "parameters": {"weight": 1.0, "density": 0.5}},
                        {"model": "./inputs/b", "parameters": {"weight": 0.7, "density": 0.3}}]},
    "ties_3_unnormalized": {"merge_method": "ties", "base_model": "./inputs/base",
                            "parameters": {"normalize": False, "density": 0.4, "weight": 0.5},
                            "models": [{"model": "./inputs/base"}, {"model": "./inputs/a"}, {"model": "./inputs/b"},
                                       {"model": "./inputs/c", "parameters": {"weight": 1.2, "density": 0.7}}]},
    "dare_ties_density1": {"merge_method": "dare_ties", "base_model": "./inputs/base",
                           "models": [{"model": "./inputs/a", "parameters": {"weight": 0.6, "density": 1.0}},
                                      {"model": "./inputs/b", "parameters": {"weight": 0.9, "density": 1.0}}]},
    "dare_linear_density1": {"merge_method": "dare_linear", "base_model": "./inputs/base",
                             "parameters": {"normalize": True},
                             "models": [{"model": "./inputs/a", "parameters": {"weight": 0.6, "density": 1.0}},
                                        {"model": "./inputs/b", "parameters": {"weight": 0.9, "density": 1.0}}]},
    "dare_linear_half": {"merge_method": "dare_linear", "base_model": "./inputs/base",
                         "models": [{"model": "./inputs/a", "parameters": {"weight": 0.8, "density": 0.5}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "./inputs/base",
                    "models": [{"model": "./inputs/a", "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.1}},
                               {"model": "./inputs/b", "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "./inputs/base",
                         "parameters": {"normalize": True, "gamma": 0.02},
                         "models": [{"model": "./inputs/a", "parameters": {"weight": 1.0, "density": 0.4}},
                                    {"model": "./inputs/b", "parameters": {"weight": 0.8, "density": 0.5}},
                                    {"model": "./inputs/c", "parameters": {"weight": 0.6, "density": 0.3}}]},
}


def llama_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 2,
        "vocab_size": VOCAB, "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32", "hidden_act": "silu",
    }


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    return shapes


def write_inputs() -> None:
    rng = np.random.default_rng(12)
    shapes = llama_shapes()
    base = {n: rng.normal(0, 0.5, s).astype(np.float32) for n, s in shapes.items()}
    models = {"base": base}
    for name, std in (("a", 0.1), ("b", 0.2), ("c", 0.05)):
        models[name] = {n: (v + rng.normal(0, std, v.shape)).astype(np.float32) for n, v in base.items()}
    for name, tensors in models.items():
        d = ROOT / "inputs" / name
        d.mkdir(parents=True, exist_ok=True)
        write_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(llama_config(), indent=1) + "\n")


def run_mergekit(mergekit: str) -> None:
    import yaml

    (ROOT / "configs").mkdir(exist_ok=True)
    (ROOT / "outputs").mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for case, cfg in CASES.items():
        cfg = {**cfg, "dtype": "float32"}
        path = ROOT / "configs" / f"{case}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([mergekit, str(path), tmp, "--random-seed", "0"], cwd=ROOT, env=env, check=True)
            src = open_checkpoint(tmp)
            tensors = {n: src.read(n) for n in sorted(src.keys())}
            write_safetensors(ROOT / "outputs" / f"{case}.safetensors", tensors, metadata={"writer": "mergekit-yaml"})
        print(case, "ok")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mergekit", required=True, help="path of mergekit-yaml in its own virtualenv")
    args = p.parse_args()
    if (ROOT / "inputs").exists():
        shutil.rmtree(ROOT / "inputs")
    write_inputs()
    run_mergekit(args.mergekit)


if __name__ == "__main__":
    main()
