"""How data/demo/corpus.jsonl was cut from cmedqa-im.

Rerun: python data/demo/select.py ../shared/data/cmedqa-im

800 doctor answers: every document relevant to the first 300 dev queries (so the demo has answers to real
questions), the answer used in the README example, then a seeded random fill from the rest.
"""

import csv
import json
import random
import sys
from pathlib import Path

SIZE = 800
README_EXAMPLE = "dbbb819dc87"

root = Path(sys.argv[1])
docs = {json.loads(line)["_id"]: line for line in (root / "corpus.jsonl").open(encoding="utf-8")}
with (root / "qrels" / "dev.tsv").open(encoding="utf-8") as fh:
    rows = list(csv.DictReader(fh, delimiter="\t"))
chosen = {README_EXAMPLE}
for query in list(dict.fromkeys(r["query-id"] for r in rows))[:300]:
    chosen.update(r["corpus-id"] for r in rows if r["query-id"] == query)
rest = sorted(set(docs) - chosen)
random.Random(13).shuffle(rest)
chosen.update(rest[: SIZE - len(chosen)])
out = Path(__file__).with_name("corpus.jsonl")
with out.open("w", encoding="utf-8") as fh:
    for doc_id in docs:  # keep the source order
        if doc_id in chosen:
            fh.write(docs[doc_id])
print(f"wrote {len(chosen)} documents to {out}")
