"""Weight-space warm start of the hypernetwork, before `jobs/train.py --init-checkpoint` (see video2lora/warmstart.py).

    python jobs/pretrain_hypernet.py --manifest clips.parquet --backbone /models/bb --prepared outputs/train/prepared \
        --output outputs/warm
    python jobs/train.py --manifest clips.parquet --backbone /models/bb --prepared outputs/train/prepared \
        --init-checkpoint outputs/warm ...

1. fits one LightLoRA per effect label of the prepared training clips (diffusion loss, aux matrices shared);
2. trains the hypernetwork to predict, from each reference latent, its effect's LightLoRA.
Writes a Video2LoRA artifact (safetensors + config.json) to --output, plus warmstart.json (loss curves, regression
error and nearest-effect accuracy on clips held out of the fit) and lora_tables.safetensors. Single process: run it
on one GPU (`--device cuda`, e.g. `ray job submit --entrypoint-num-gpus 1`) or on CPU for the small worlds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True,
                   help="a complete preparation, or a root to prepare --manifest into (or reuse), as jobs/train.py")
    p.add_argument("--manifest", default="", help="training manifest to prepare when --prepared is a root")
    p.add_argument("--ray-address", default=None, help="for the preparation: default the job's cluster, else local")
    p.add_argument("--backbone", required=True, help="the frozen backbone the preparation was made with")
    p.add_argument("--output", required=True, help="where the warm-started Video2LoRA artifact goes (local or s3://)")
    p.add_argument("--split", default="train", help="manifest split to fit on")
    p.add_argument("--model-config", default="", help='JSON overrides, e.g. \'{"hyper": {"width": 96}}\'')
    p.add_argument("--table-steps", type=int, default=800, help="steps of the per-effect LoRA fit")
    p.add_argument("--factorise", action="store_true",
                   help="compound effects ('motion+look'): fit one LoRA per motion and per look, an effect's LoRA "
                        "being its two side by side (needs an even LoRA rank)")
    p.add_argument("--tables-from", default="",
                   help="an earlier warm start's --output on the same preparation: take its LoRA tables and the aux "
                        "matrices fitted with them instead of fitting again (--table-* ignored), e.g. to try another "
                        "hypernetwork")
    p.add_argument("--table-lr", type=float, default=2e-3)
    p.add_argument("--table-batch-size", type=int, default=8)
    p.add_argument("--regress-steps", type=int, default=1500, help="steps of the hypernetwork regression")
    p.add_argument("--regress-lr", type=float, default=1e-3, help="peak rate (cosine decay to zero)")
    p.add_argument("--regress-batch-size", type=int, default=32)
    p.add_argument("--eval-rows", type=int, default=200, help="clips per split in the effect-loss report")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    import torch

    from pipelines.train import model_config, parse_model_overrides
    from video2lora import storage
    from video2lora.backbones import Backbone
    from video2lora.generate import new_model_for
    from video2lora.training import PREPARED_NAME, PreparedData
    from video2lora.training.warmstart import (effect_losses, fit_lora_tables, hypernet_weights, part_accuracy, regress_hypernet,
                                      table_weights)

    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    try:
        overrides = parse_model_overrides(a.model_config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prepared = a.prepared
    if not storage.exists(storage.join(prepared, PREPARED_NAME)):
        if not a.manifest:
            print(f"error: {storage.redact(prepared)} is not a complete preparation; give --manifest to prepare into it",
                  file=sys.stderr)
            return 2
        from pipelines.common import ManifestError, init_ray
        from pipelines.prepare import resolve_prepared

        init_ray(a.ray_address)
        try:
            prepared = resolve_prepared(prepared, a.manifest, a.backbone,
                                        encoder_num_gpus=1.0 if a.device.startswith("cuda") else 0.0).uri
        except ManifestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    a.prepared = prepared
    try:
        data = PreparedData.load(a.prepared, a.split)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    groups = sorted(set(data.effects))
    if len(groups) < 2:
        print(f"error: {storage.redact(a.prepared)} split {a.split!r} has {len(groups)} effect label(s); the warm "
              "start needs clips of at least 2 effects (the `effect` column of the training manifest)", file=sys.stderr)
        return 2
    backbone = Backbone.from_pretrained(a.backbone, device=a.device, dtype=torch.float32)
    model = new_model_for(backbone, model_config(overrides), seed=a.seed)
    print(f"warm start: {len(data.index)} clips of {len(groups)} effects; hypernetwork "
          f"{model.num_parameters()['hypernetwork']:,} params", flush=True)
    parts_of = None
    if a.factorise:  # refuse labels that do not split, before any training
        from video2lora.effects.world import effect_factors
        from video2lora.training.warmstart import check_factorisation

        parts_of = effect_factors
        try:
            check_factorisation(groups, parts_of, model.config.lora.rank)
        except ValueError as e:
            print(f"error: --factorise: {e}", file=sys.stderr)
            return 2
    if a.tables_from:
        try:
            table, table_history = read_tables(a.tables_from, model, groups, parts_of, a.prepared, a.split)
        except (storage.StorageError, FileNotFoundError, ValueError) as e:
            print(f"error: --tables-from: {e}", file=sys.stderr)
            return 2
    else:
        table, table_history = fit_lora_tables(model, backbone, data, steps=a.table_steps,
                                               batch_size=a.table_batch_size, lr=a.table_lr, seed=a.seed,
                                               parts_of=parts_of)
    regress_history = regress_hypernet(model, data, table, steps=a.regress_steps, batch_size=a.regress_batch_size,
                                       lr=a.regress_lr, seed=a.seed, device=a.device)
    model.save_pretrained(a.output)
    # does the LoRA carry the effect? loss with a reference of the clip's own effect vs of another effect vs none
    losses = {"table": effect_losses(model, backbone, data, table_weights(data, table), max_rows=a.eval_rows),
              "hypernet": effect_losses(model, backbone, data, hypernet_weights(data, model), max_rows=a.eval_rows)}
    parts = {a.split: part_accuracy(model, data, table)} if table.units is not None else {}
    for split in sorted({r.get("split") or "train" for r in PreparedData.load(a.prepared, "all").index} - {a.split}):
        other = PreparedData.load(a.prepared, split)
        if len(set(other.effects)) > 1:
            losses[f"hypernet_{split}"] = effect_losses(model, backbone, other, hypernet_weights(other, model),
                                                        max_rows=a.eval_rows)
            if table.units is not None:  # LoRAs composed from parts fitted on other partners: the target it has
                try:
                    table.weights(sorted(set(other.effects)))
                except (KeyError, ValueError) as e:  # a label or part training never had: no target to compare
                    print(f"note: split {split!r}: {e}", flush=True)
                    continue
                losses[f"table_{split}"] = effect_losses(model, backbone, other, table_weights(other, table),
                                                         max_rows=a.eval_rows)
                parts[split] = part_accuracy(model, other, table)
    for name, l in losses.items():
        print(f"diffusion loss, {name}: no LoRA {l['none']:.4f}, own-effect reference {l['own_effect']:.4f}, "
              f"other-effect reference {l['other_effect']:.4f} (other - own {l['other_effect'] - l['own_effect']:+.4f} "
              f"± {l['margin_se']:.4f})", flush=True)
    storage.write_bytes_atomic(storage.join(a.output, "lora_tables.safetensors"), table.to_bytes())
    for split, acc in parts.items():
        print(f"predicted LoRA nearest to the reference's own part ({split} clips), per part: "
              + ", ".join(f"{x:.2f}" for x in acc), flush=True)
    report = {"groups": table.groups, "clips": len(data.index), "table": table_history, "effect_losses": losses,
              "part_accuracy": parts,
              "regression": regress_history, "wall_s": time.perf_counter() - start, "args": vars(a)}
    storage.write_bytes_atomic(storage.join(a.output, "warmstart.json"), json.dumps(report, indent=2).encode())
    first, last = (h.get("val", h["fit"]) for h in (regress_history[0], regress_history[-1]))
    print(f"done in {report['wall_s'] / 60:.1f} min: LoRA-table loss {table_history[0]['loss']:.4f} -> "
          f"{table_history[-1]['loss']:.4f}; hypernetwork on clips held out of the fit: relative error "
          f"{first['relative_error']:.3f} -> {last['relative_error']:.3f}, right effect "
          f"{first['nearest_group_accuracy']:.2f} -> {last['nearest_group_accuracy']:.2f}; artifact in {storage.redact(a.output)}")
    return 0


def read_tables(uri: str, model, groups: list[str], parts_of, prepared: str, split: str):
    """An earlier warm start's LoRA tables, its table-fit history, and (into `model`) the aux matrices fitted with
    them. Refused unless it was fitted on the same preparation (its key hashes the manifest, the backbone URI and the
    clip size: `training.data.prepared_key`) and split, for the same effect labels, LoRA shape and factorisation."""
    import torch

    from video2lora import storage
    from video2lora.hypernet import Video2LoRAModel
    from video2lora.training.warmstart import LoRATable

    report, name = storage.join(uri, "warmstart.json"), storage.join(uri, "lora_tables.safetensors")
    try:
        earlier = json.loads(storage.read_bytes(report))
        fitted_on, fitted_split, history = earlier["args"]["prepared"], earlier["args"]["split"], earlier["table"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{storage.redact(report)}: not a warm start's report ({e!r})") from None
    key = lambda u: os.path.basename(str(u).rstrip("/"))  # noqa: E731
    if (key(fitted_on), fitted_split) != (key(prepared), split):
        raise ValueError(f"{storage.redact(uri)} was fitted on preparation {key(fitted_on)} split {fitted_split!r}, "
                         f"not {key(prepared)} split {split!r}")
    table = LoRATable.from_bytes(storage.read_bytes(name), storage.redact(name), parts_of)
    if table.groups != groups:
        raise ValueError(f"{storage.redact(name)} holds LoRAs of {table.groups}, the clips have effects {groups}")
    if (parts_of is None) != (table.units is None):
        raise ValueError(f"{storage.redact(name)}: {'no' if parts_of else 'a'} factorised table; run "
                         f"with{'out' if parts_of else ''} --factorise as it was")
    aux = Video2LoRAModel.from_pretrained(uri)
    shape = lambda c: ([tuple(l) for l in c.layers], c.lora.rank, c.lora.down, c.lora.up, c.lora.alpha)  # noqa: E731
    if shape(aux.config) != shape(model.config):
        raise ValueError(f"{storage.redact(uri)}: its LoRA rank, down, up or alpha, or its adapted layers, differ "
                         "from this model's")
    with torch.no_grad():
        for mine, theirs in zip([*model.a_aux, *model.b_aux], [*aux.a_aux, *aux.b_aux]):
            mine.copy_(theirs)
    return table, history


if __name__ == "__main__":
    sys.exit(main())
