import re

import pytest

from cgpo_trl.saliency.prompts import TASKS, build_prompt
from cgpo_trl.saliency.rewards import read_answer

SHOWN_ANSWERS = re.compile(r"(?:Example|empty): ((?:<think>.*?</think>)?<answer>.*?</answer>)")


@pytest.mark.parametrize("task", TASKS)
def test_prompt_is_one_user_turn_with_images_then_text(task):
    num_images = 3 if task == "cosod" else 1
    prompt = build_prompt(task, num_images=num_images)
    assert len(prompt) == 1 and prompt[0]["role"] == "user"
    content = prompt[0]["content"]
    assert content[:num_images] == [{"type": "image"}] * num_images
    assert len(content) == num_images + 1 and content[-1]["type"] == "text"


def test_instructions_name_the_task_tag():
    assert "<rg></rg>" in build_prompt("sod")[0]["content"][-1]["text"]
    assert "<ins></ins>" in build_prompt("sis")[0]["content"][-1]["text"]
    cosod = build_prompt("cosod", num_images=4)[0]["content"][-1]["text"]
    assert "4 images" in cosod and "<rg></rg>" in cosod


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_an_instruction_shows_is_one_the_rewards_accept(task):
    """SOD and SIS also show the answer for "nothing is salient" (empty); a CoSOD group always shares an object."""
    text = build_prompt(task, num_images=2 if task == "cosod" else 1)[0]["content"][-1]["text"]
    shown = [read_answer(answer, task) for answer in SHOWN_ANSWERS.findall(text)]
    assert shown and all(parsed.ok for parsed in shown)
    empty = [parsed for parsed in shown if not parsed.regions and not parsed.instances]
    assert len(shown) - len(empty) == 1
    assert len(empty) == (0 if task == "cosod" else 1)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'detect'"):
        build_prompt("detect")
    with pytest.raises(ValueError, match="takes exactly one image"):
        build_prompt("sod", num_images=2)
    with pytest.raises(ValueError, match="positive integer"):
        build_prompt("cosod", num_images=0)
