r"""Counts the English prose that Debian HTML manuals would add to an LM corpus.

    python experiments/corpus_survey.py --cache_dir=/tmp/survey \
        --packages=rust-doc,postgresql-doc-15 [--out=survey.json]

For each package: fetch and unpack it as the corpus builders do
(`debian.PackageRoots`: SHA-256 checked, no symlink followed out of the
tree), read every `.html` page with the Sphinx reader's `<p>` parser and
count the paragraphs of `html_manuals.MIN_WORDS`+ words, before dedup
(the corpus's sentence and paragraph dedup removes some of them).
"""

import argparse
import json
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tf_moe.data import cleaning  # noqa: E402
from tf_moe.data import debian  # noqa: E402
from tf_moe.data.sources import html_manuals  # noqa: E402


def count_page(path):
    """(words, paragraphs) of one page's long-enough `<p>` texts."""
    markup = path.read_text(encoding="utf-8", errors="replace")
    words = [cleaning.word_count(p) for p in html_manuals.html_paragraphs(markup)]
    words = [w for w in words if w >= html_manuals.MIN_WORDS]
    return sum(words), len(words)


def survey(root, pool):
    """Pages, words and paragraphs under an unpacked package `root`."""
    totals = {"pages": 0, "words": 0, "paragraphs": 0}
    pages = list(debian.tree_files(root, "", "*.html"))
    for words, paragraphs in pool.imap_unordered(count_page, pages, chunksize=32):
        totals["pages"] += 1
        totals["words"] += words
        totals["paragraphs"] += paragraphs
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", required=True, help="downloaded and unpacked packages")
    parser.add_argument("--packages", required=True, help="comma-separated Debian packages")
    parser.add_argument("--out", default=None, help="JSON file for the counts")
    args = parser.parse_args(argv)
    names = [n for n in args.packages.split(",") if n]
    roots = debian.PackageRoots(cache_dir=args.cache_dir).roots(names)
    results = {}
    print("| package | pages | words (M) | paragraphs |")
    print("| --- | ---: | ---: | ---: |")
    with multiprocessing.Pool() as pool:
        for name in names:
            r = results[name] = survey(roots[name], pool)
            print(f"| {name} | {r['pages']} | {r['words'] / 1e6:.2f} | {r['paragraphs']} |",
                  flush=True)
    total = sum(r["words"] for r in results.values())
    print(f"| total | | {total / 1e6:.2f} | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
