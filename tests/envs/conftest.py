"""Fixtures of the environment tests: TextWorld games generated offline once per session."""

import pytest


@pytest.fixture(scope="session")
def tw_games(tmp_path_factory):
    """Two easy TextWorld games (one train, one test), made with TextWorld's own generator (~3 s each)."""
    pytest.importorskip("textworld", reason="TextWorld is installed by `make install`")
    from opdkit.envs.textworld import make_games

    root = tmp_path_factory.mktemp("tw_games")
    return make_games(root / "train", 1, difficulty="easy", split="train") + make_games(
        root / "test", 1, difficulty="easy", split="test")
