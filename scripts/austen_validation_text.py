#!/usr/bin/env python3
"""Write the bundled model's validation text (models/mamba2-tiny/validation.txt).

It is the text `train_tiny_model.py` held out: the last 5 % of the paragraphs of each of the six
novels, joined as in training (novels separated by the `<|endoftext|>` line). The text is public
domain (Jane Austen); the package it comes from is fetched with `apt-get download`.

    python3 scripts/austen_validation_text.py [--work DIR]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_model import prepare_corpus  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--work", default="/tmp/austen", help="scratch folder for the package")
args = ap.parse_args()
work = Path(args.work)
work.mkdir(parents=True, exist_ok=True)
prepare_corpus(work)
out = Path(__file__).resolve().parent.parent / "models/mamba2-tiny/validation.txt"
out.write_text((work / "corpus_val.txt").read_text())
print(f"wrote {out} ({out.stat().st_size} bytes)")
