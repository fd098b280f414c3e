"""The paper's first two steps from Python, as one would type them in a notebook: load SmolLM2
by its catalog name, draw the cosine figure with matplotlib, run a short localisation sweep.

    pip install safety_layers-*.whl matplotlib pandas   # see README, "From Python"
    SAFETY_LAYERS_DATA=... SAFETY_LAYERS_MODELS=... python examples/notebook.py --out /tmp/nb
"""

import argparse
import tempfile

import matplotlib

matplotlib.use("Agg")  # a script has no display; in Jupyter leave this out
import matplotlib.pyplot as plt
import pandas as pd

import safety_layers as sl

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=tempfile.mkdtemp(prefix="safety-layers-"))
out = ap.parse_args().out

# --- what a notebook holds -------------------------------------------------------------------
model = sl.Model.load("smollm2-135m-instruct")
print(model.info["family"], model.info["layers"], "layers,", model.info["parameters"], "params")

cos = sl.cosine(model, pairs="all", out=f"{out}/cosine")  # the paper's normal/malicious sets
df = pd.DataFrame(cos.entries)
fig, ax = plt.subplots(figsize=(7, 4))
for pair, label in [("nn", "N-N"), ("mm", "M-M"), ("nm", "N-M")]:
    ax.plot(df.layer, df[f"{pair}_mean"], label=label)
    ax.fill_between(df.layer, df[f"{pair}_mean"] - df[f"{pair}_std"],
                    df[f"{pair}_mean"] + df[f"{pair}_std"], alpha=0.2)
ax.set(xlabel="layer", ylabel="cosine similarity", title=f"{model.name}: initial range "
       f"{cos.initial_range}")
ax.legend()
fig.savefig(f"{out}/cosine.png", dpi=100)

loc = sl.locate(model, initial=cos.initial_range or (6, 12), alpha=1.2, limit=16, span=1,
                out=f"{out}/locate")
print(pd.DataFrame(loc.to_records()).to_string(index=False))
print("safety layers:", loc.range, f"(baseline {loc.baseline} of {loc.queries} refused)")
# ---------------------------------------------------------------------------------------------
print(f"wrote {out}/cosine.png, {out}/cosine/ and {out}/locate/")
