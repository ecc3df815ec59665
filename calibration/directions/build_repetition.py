"""The repetition ("copy") direction: residuals that predict a token repeating an earlier 4-gram, minus the rest.

    python calibration/directions/build_repetition.py [--generate] [--layers 12 15]

Data: repetition.train.jsonl, the bundled model's own greedy answers (64 new tokens) to benign prompts of
calibration/data/harmful_requests.train.jsonl (< 300 characters, every 3rd from the 2nd, first 120; the
test split stays held out for benchmarks/steering.py). ``--generate`` rewrites it (slow on a shared CPU).
For each answer, the residual at answer token j is labelled *copying* when token j+1 completes a token
4-gram already seen earlier in the answer; the direction is mean(copying) - mean(other answer tokens),
at each layer (``repetition-l<L>.safetensors`` + a record: token counts; AUROC and mean gap on the
tokens of every 5th answer, held out). Steering away
from it (negative strength) is what benchmarks/steering.py measures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
DATA = HERE / "repetition.train.jsonl"


def prompts() -> list[str]:
    rows = [json.loads(x) for x in (ROOT / "calibration/data/harmful_requests.train.jsonl").read_text().splitlines()
            if x.strip()]
    benign = [r["text"] for r in rows if r["label"] == 0 and len(r["text"]) < 300]
    return benign[1::3][:120]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", action="store_true", help="regenerate repetition.train.jsonl")
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 15])
    args = ap.parse_args()
    torch.set_num_threads(2)
    from guardrails.offline.activations import collect_residuals
    from guardrails.offline.directions import Direction, DirectionRecord, save_direction
    from guardrails.offline.steering_eval import copy_positions, generate
    from guardrails.serving.models import load_model

    model, tok = load_model()
    if args.generate or not DATA.is_file():
        ps = prompts()
        outs = generate(model, tok, ps, max_new_tokens=64)
        DATA.write_text("".join(json.dumps({"prompt": p, "response": o}, ensure_ascii=False) + "\n"
                                for p, o in zip(ps, outs, strict=True)))
    rows = [json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]
    res = collect_residuals(model, tok, [r["prompt"] for r in rows], args.layers,
                            responses=[r["response"] for r in rows], scope="output", progress=False)
    for layer in args.layers:
        groups: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {False: ([], []), True: ([], [])}
        norms = []
        for i, r in enumerate(rows):
            ids = tok(r["response"], add_special_tokens=False)["input_ids"]
            X = res[layer][i]
            if X.shape[0] != len(ids):  # scored tokens do not line up with the answer's tokens: skip the row
                continue
            m = torch.tensor(copy_positions(ids), dtype=torch.bool)
            pos, neg = groups[i % 5 == 4]  # every 5th answer held out
            pos.append(X[:-1][m])
            neg.append(X[:-1][~m])
            norms.append(X.norm(dim=-1))
        P, N = torch.cat(groups[False][0]), torch.cat(groups[False][1])
        vec = P.mean(0) - N.mean(0)
        u = vec / vec.norm()
        pp, nn_ = (torch.cat(groups[True][0]) @ u).numpy(), (torch.cat(groups[True][1]) @ u).numpy()
        auroc = float((pp[:, None] > nn_[None, :]).mean())
        norm = float(torch.cat(norms).median())
        rec = DirectionRecord(
            kind="diffmean", layer=layer, data=str(DATA.relative_to(ROOT)),
            data_sha256=hashlib.sha256(DATA.read_bytes()).hexdigest(), n_positive=len(P), n_negative=len(N),
            pool="answer tokens: predicts a repeated token 4-gram (1) vs not (0)", residual_norm=round(norm, 4),
            direction_norm=round(float(vec.norm()), 4), heldout_auroc=round(auroc, 4),
            heldout_gap=round(float((pp.mean() - nn_.mean()) / norm), 4), n_heldout=len(pp) + len(nn_),
            model="bundled", date=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"))
        save_direction(Direction(vec.float(), rec), HERE / f"repetition-l{layer}")
        print(f"layer {layer}: {len(P)} copying / {len(N)} other tokens; held out ({len(pp)} / {len(nn_)} tokens): "
              f"AUROC {auroc:.3f}, gap {rec.heldout_gap} x norm")


if __name__ == "__main__":
    main()
