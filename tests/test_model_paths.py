"""Model paths that cannot be loaded, or not as asked, are one line naming the config key: a
missing local folder (before any hub lookup), a file, a folder of the wrong kind (a causal LM
loaded as a reward model or the other way round), a folder without tokenizer files. Hub names
still go to the hub (offline here: the loader's own message)."""

import re

import pytest
from helpers import TINY

from vrpo_fast.errors import UserError
from vrpo_fast.models import (
    build_tiny_causal_lm,
    byte_tokenizer,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    model_context,
    tiny_llama_config,
)

LOADERS = {
    "causal_lm": lambda p, what: load_causal_lm(p, what=what),
    "causal_lm_empty": lambda p, what: load_causal_lm(p, what=what, empty=True),
    "reward_model": lambda p, what: load_reward_model(p, what=what),
    "reward_model_empty": lambda p, what: load_reward_model(p, what=what, empty=True),
    "tokenizer": lambda p, what: load_tokenizer(p, what),
    "context": lambda p, what: model_context(p, what),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No hub access: a lookup that gets past the checks fails at once, and visibly."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A causal LM, one with tied embeddings (no lm_head in its file), and a reward model."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("models")
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(root / "lm")
    byte_tokenizer().save_pretrained(root / "lm")
    build_tiny_causal_lm(seed=0, tie_word_embeddings=True, **TINY).save_pretrained(root / "tied")
    AutoModelForSequenceClassification.from_config(
        tiny_llama_config(num_labels=1, **TINY)).save_pretrained(root / "rm")
    return root


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("path", ["/nope/nomodel", "./x", "~/no-such-model", "a/b/c", "my model"])
def test_missing_local_path_is_named_before_the_hub(loader, path):
    with pytest.raises(UserError, match=rf"^aux\.path: no such folder {re.escape(repr(path))}"):
        LOADERS[loader](path, "aux.path")


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_absolute_folder_is_named(loader, tmp_path):
    path = str(tmp_path / "nomodel")
    with pytest.raises(UserError, match=rf"^model\.path: no such folder {re.escape(repr(path))}$"):
        LOADERS[loader](path, "model.path")


@pytest.mark.parametrize("loader", LOADERS)
def test_hub_name_still_goes_to_the_hub(loader):
    # Not a local folder, but a valid hub name: the hub is asked (and, offline, says so).
    with pytest.raises(UserError, match=r"^--judge lm:PATH: cannot (load|read) .* from "
                                        r"'someone/no-such-model': ") as err:
        LOADERS[loader]("someone/no-such-model", "--judge lm:PATH")
    assert "no such folder" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_file_is_not_a_model_folder(loader, tmp_path):
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(UserError,
                       match=rf"^model\.path: {re.escape(str(file))} is a file, not a model "
                             rf"folder$"):
        LOADERS[loader](str(file), "model.path")


@pytest.mark.parametrize("empty", [False, True])
def test_causal_lm_folder_is_not_a_reward_model(folders, empty):
    path = str(folders / "lm")
    with pytest.raises(UserError, match=rf"^aux\.path: {re.escape(path)} is not a reward model "
                                        r"\(its weights lack the score head: score\.weight\)$"):
        load_reward_model(path, what="aux.path", empty=empty)


@pytest.mark.parametrize("empty", [False, True])
def test_reward_model_folder_is_not_a_causal_lm(folders, empty):
    path = str(folders / "rm")
    with pytest.raises(UserError, match=rf"^aux\.path: {re.escape(path)} is not a causal LM "
                                        r"\(its weights lack lm_head\.weight\)$"):
        load_causal_lm(path, what="aux.path", empty=empty)


def test_folders_of_the_right_kind_still_load(folders):
    for name in ("lm", "tied"):                 # tied: no lm_head.weight in the file, rightly
        load_causal_lm(str(folders / name))
        load_causal_lm(str(folders / name), empty=True)
    tied = load_causal_lm(str(folders / "tied"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert load_reward_model(str(folders / "rm")).config.num_labels == 1
    assert load_reward_model(str(folders / "rm"), empty=True) is not None
    # The start of reward-model training: a causal LM gets a fresh head, as asked.
    assert load_reward_model(str(folders / "lm"), new_head=True).config.num_labels == 1
    assert model_context(str(folders / "lm")) == 1024
    assert load_tokenizer(str(folders / "lm")).pad_token is not None


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match=r"^model\.tokenizer: emptydir holds no tokenizer files "
                                        r"\(tokenizer\.json, tokenizer_config\.json, \.\.\.\)$"):
        load_tokenizer("emptydir", "model.tokenizer")


def test_tokenizer_error_is_joined_not_cut(tmp_path):
    # A config but no vocabulary: the loader's message spans several lines; all of it is kept.
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^model\.tokenizer: cannot load a tokenizer from 'tok': "
                                        r"Couldn't instantiate the backend tokenizer from one "
                                        r"of: \S") as err:
        load_tokenizer("tok", "model.tokenizer")
    assert "\n" not in str(err.value)
