import pytest

from cgpo_trl.saliency.prompts import TASKS, build_prompt


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


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'detect'"):
        build_prompt("detect")
    with pytest.raises(ValueError, match="takes exactly one image"):
        build_prompt("sod", num_images=2)
    with pytest.raises(ValueError, match="positive integer"):
        build_prompt("cosod", num_images=0)
