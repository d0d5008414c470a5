"""Golden outputs of Llama-family models from the reference library (transformers, torch).

Not needed by the test suite: it writes the small fixtures the suite checks against, and checks
a checkpoint exported by `hiermodel export` loads in the reference library with the same logits.
Needs the `reference` extra (pip install -e ".[reference]").

  python tools/llama_reference.py fixtures tests/fixtures/llama
  python tools/llama_reference.py check-export EXPORT_DIR EXPECTED.npz   # ids and logits from hiermodel

Each fixture directory holds a tiny random model in the Hugging Face layout (config.json,
model.safetensors) and golden.npz: `ids` [2, T] with their `logits` [2, T, V], and `inputs`
[2, T, D] (vectors fed to the layers instead of embeddings) with the `hidden` states after the
final norm.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SENTENCES = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Čeština má háčky a čárky; 日本語も少し。",
] * 20
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=304,
             max_position_embeddings=256)
CASES = {
    # Llama 3.2 1B's choices at a tiny size: tied embeddings, grouped-query attention.
    "llama_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0)),
    # Untied, one key/value head per two query heads, stored in bfloat16.
    "llama_untied_bf16": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0)),
    # Llama 3.1's RoPE scaling, with a short original context so that rows reach past it; the
    # config is written the way Meta's releases have it (rope_theta and rope_scaling).
    "llama31_scaled": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500000.0,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Qwen2: biases on the query, key and value projections.
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
                            use_sliding_window=False)),
}


def byte_level_tokenizer(size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tokenizer


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights of unit-scale activations (the library's 0.02 init makes every logit nearly 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or "embed" in name:
                p.copy_(noise * (0.5 if name.endswith("bias") else 1.0))
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def build(kind: str, options: dict) -> transformers.PreTrainedModel:
    if kind == "llama":
        config = transformers.LlamaConfig(**SHAPE, **options, bos_token_id=0, eos_token_id=1)
        return transformers.LlamaForCausalLM(config)
    config = transformers.Qwen2Config(**SHAPE, **options, bos_token_id=None, eos_token_id=1)
    return transformers.Qwen2ForCausalLM(config)


def write_fixture(directory: Path, kind: str, options: dict, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model = build(kind, options).eval()
    randomize(model, generator)
    if "bf16" in directory.name:  # golden outputs of the weights as stored (buffers such as RoPE's stay float32)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    ids = torch.randint(0, 300, (2, 48), generator=generator)
    inputs = torch.randn(2, 48, SHAPE["hidden_size"], generator=generator)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.model(inputs_embeds=inputs).last_hidden_state
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if "bf16" in directory.name:
        stored = {name: p.detach().to(torch.bfloat16) for name, p in model.state_dict().items()}
        safetensors.torch.save_file(stored, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "generation_config.json").unlink(missing_ok=True)
    if "rope_scaling" in options:  # the layout of the Llama 3.1 and 3.2 releases
        config = json.loads((directory / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = rope
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(input_ids=ids).logits, logits, atol=1e-5), "legacy rope layout differs"
    if kind == "llama" and options.get("tie_word_embeddings"):
        byte_level_tokenizer(300).save(str(directory / "tokenizer.json"))
    np.savez_compressed(directory / "golden.npz", ids=ids.numpy().astype(np.int32), logits=logits.numpy(),
                        inputs=inputs.numpy(), hidden=hidden.numpy())
    print(f"{directory}: {sum(p.numel() for p in model.parameters()):,} parameters")


def check_export(directory: Path, expected: Path) -> int:
    """Logits of the exported checkpoint in the reference library against hiermodel's."""
    golden = np.load(expected)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(golden["ids"]).long()).logits.numpy()
    error = float(np.abs(logits - golden["logits"]).max())
    print(f"{directory}: {type(model).__name__}, largest logit difference {error:.2e} over {logits.size:,} logits")
    return 0 if error < 1e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fixtures = sub.add_parser("fixtures", help="write the golden fixtures")
    fixtures.add_argument("output", type=Path)
    check = sub.add_parser("check-export", help="load an exported checkpoint and compare its logits")
    check.add_argument("directory", type=Path)
    check.add_argument("expected", type=Path, help="npz with ids [B, T] and hiermodel's logits [B, T, V]")
    args = parser.parse_args()
    if args.command == "check-export":
        return check_export(args.directory, args.expected)
    for seed, (name, (kind, options)) in enumerate(CASES.items()):
        write_fixture(args.output / name, kind, options, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
