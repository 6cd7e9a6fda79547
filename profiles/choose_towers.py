"""How profile `world` chose chapter 2's tower setting: one LiT image tower (seed 1, batch 64, the chapter's
`towers.schedule`) trained on PAIRS pre-rendered world pairs for STEPS steps, scored every eighth of the schedule on
the world's *validation* split (100 images per task, the five tasks pooled), against the world CLIP there; the
OTFusion claim needs each tower at 80 % of the world CLIP's top-1. Prints one JSON line.

    RCLIP_CACHE=<dir> HF_HUB_OFFLINE=1 python profiles/choose_towers.py 32768 3200    # about 9 min on 2 cores
"""
import json, sys, time, tempfile
from dataclasses import replace
import torch
from rclip import models, world
from rclip.methods import towers as tw
from rclip.methods.robust_finetune import freeze_all_but_image_encoder
from rclip.train import fit
import open_clip

torch.set_num_threads(2)
pairs, steps, lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else tw.LR
base = models.load("world")
tasks = {t: world.zeroshot_task(t, split="val", n=100, resolution=64, seed=0)
         for t in ["shape", "colour", "texture", "count", "colour_shape"]}
ref_scores, _ = tw.evaluate({"world CLIP": base}, tasks)
ref = tw.pooled_top1(ref_scores, "world CLIP")
cfg = tw.TowerConfig(pairs=pairs, resolution=64, data_seed=0, train=tw.schedule(steps, 64, lr, seed=1))
train = replace(cfg.train, eval_every=max(1, steps // 8))
t0 = time.time(); data = tw._lit_pairs(base, cfg); t_data = time.time() - t0
torch.manual_seed(1)
tower = base.with_visual(open_clip.model.CLIP(**base.meta["model_cfg"]).visual.state_dict())
freeze_all_but_image_encoder(tower.model)

def ev(b):
    s, l = tw.evaluate({"t": b}, tasks)
    return {"top1": tw.pooled_top1(s, "t"), "rel": 100 * tw.pooled_top1(s, "t") / ref, "loss": l["t"]}

t0 = time.time()
with tempfile.TemporaryDirectory() as d:
    log = fit(tower, data, train, d, tw.lit_step(tower), module=tower.model.visual, progress=False, evaluate=ev)
out = {"pairs": pairs, "steps": steps, "lr": lr, "ref_top1": ref, "data_s": round(t_data, 1),
       "train_s": round(time.time() - t0, 1), "evals": log["evals"]}
print(json.dumps(out))
