"""The agentic demo's pieces: its SFT episodes are laid out token for token as the episode runner lays out a
student's episode, with the loss on the walkthrough's commands only."""

from __future__ import annotations

import random

from opdkit.data.chat import render_chat_text
from opdkit.demo.agentic import SYSTEM, _walkthrough, episode_example
from opdkit.demo.sft import IGNORE
from opdkit.envs.base import PromptTemplate


def test_walkthrough_episodes_match_the_runners_layout(tw_games, tiny_tokenizer):
    tok = tiny_tokenizer
    template = PromptTemplate(system=SYSTEM, first="{observation}\nAdmissible commands: {admissible_commands}",
                              later="{observation}\nAdmissible commands: {admissible_commands}")
    plain = _walkthrough(tw_games[0], 6, None)
    detour = next(p for p in (_walkthrough(tw_games[0], 6, random.Random(s)) for s in range(10)) if p is not None)
    for obs, infos, commands, trained in (plain, detour):
        ex = episode_example(tok, template, obs, infos, commands, trained)
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": template.render(obs[0], infos[0], first=True)}]
        for k, c in enumerate(commands):
            msgs.append({"role": "assistant", "content": c})
            if k + 1 < len(commands):
                msgs.append({"role": "user", "content": template.render(obs[k + 1], infos[k + 1], first=False)})
        # the whole sequence decodes to the conversation the template renders (the last turn ends with EOS)
        assert tok.decode(list(ex.input_ids)) == render_chat_text(tok, msgs, add_generation_prompt=False).rstrip("\n")
        # the labels are exactly the trained commands and their EOS, in order
        labelled = [t for t in ex.labels if t != IGNORE]
        want = []
        for c, t in zip(commands, trained, strict=True):
            if t:
                want += tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labelled == want
    assert detour[3][0] is False and all(detour[3][1:])  # the detour is played, not trained on


def test_agentic_flag_combinations_are_refused(capsys):
    from opdkit.cli import main

    assert main(["demo", "--agentic", "--toy"]) == 2
    assert "--agentic" in capsys.readouterr().err
    assert main(["demo", "--agentic", "--compare"]) == 2
