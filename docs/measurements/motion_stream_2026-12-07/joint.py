import json, sys, torch
sys.argv = ["x", "two", "/dev/null", "0"]
src = open(__file__.replace("joint.py", "regress.py")).read().split("model = Video2LoRAModel(config)")[0]
exec(src)
from safetensors.torch import load_file
from video2lora.training.warmstart import predict_rows, _weight_rows
held = PreparedData.load(PREP, "heldout")
for v in ["two", "two-aug"]:
    model = Video2LoRAModel(config); model.hypernet = TwoStream(config, False)
    sd = load_file(f"/work/exp/twostream/{v}_model/video2lora.safetensors"); model.load_state_dict(sd); model.eval()
    a_u, b_u = table.a_units, table.b_units
    sa, sb = a_u.std(), b_u.std()
    units = _weight_rows(a_u, b_u, sa, sb)
    a, b = predict_rows(model, held, list(range(len(held.index))))
    ok = torch.ones(len(held.index), dtype=torch.bool)
    for j in range(2):
        near = torch.cdist(_weight_rows(a[:, :, j:j+1], b[..., j:j+1], sa, sb), units).argmin(1)
        ok &= torch.tensor([table.units[n] == effect_factors(e)[j] for n, e in zip(near.tolist(), held.effects)])
    print(v, "both parts right", float(ok.float().mean()))
