"""Fuzzing `dcae t2i sample --prompts FILE`: a damaged prompt file gives its prompts or one line naming it."""

from __future__ import annotations

import argparse

from fuzz_helpers import FUZZ, mutated_bytes, result_or_one_line
from hypothesis import given
from hypothesis import strategies as st

from dcae.diffusion.t2i.commands import read_prompts

GOOD = b"a red square\n# a comment\n\na blue circle above a green triangle\n"


@FUZZ
@given(data=st.data())
def test_damaged_prompt_file(tmp_path, data):
    path = tmp_path / "prompts.txt"
    path.write_bytes(data.draw(mutated_bytes(GOOD)))
    args = argparse.Namespace(prompt=None, prompts=str(path))
    prompts = result_or_one_line(lambda: read_prompts(args), path)
    if prompts is not None:
        assert prompts and all(isinstance(p, str) and p.strip() == p and p for p in prompts)
