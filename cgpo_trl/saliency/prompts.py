"""Task instructions for SOD, SIS and CoSOD, as TRL conversational prompts with one image block per image.

SOD and SIS images may hold nothing salient (SOC's non-salient images), so their instructions name the answer for
that case, an empty `<answer></answer>`, which the rewards score 1 exactly when the ground truth is empty. A CoSOD
group shares an object by definition, so its instruction does not offer it.
"""

from __future__ import annotations

from .tags import format_answer

TASKS: tuple[str, ...] = ("sod", "sis", "cosod")

_FORMAT = (
    "First reason step by step inside <think></think>. Then give the answer inside <answer></answer>; "
    "write nothing after </answer>."
)
_NOTHING = f" If nothing in the image is salient, leave the answer empty: {format_answer()}."

INSTRUCTIONS: dict[str, str] = {
    "sod": (
        "Find the salient object in the image: what a person looks at first. "
        + _FORMAT
        + " In the answer, name each salient region with a short referring expression inside <rg></rg>; "
        "the regions are segmented and merged into one saliency mask."
        + _NOTHING
        + " Example: "
        + format_answer("...", regions=["the brown dog"])
    ),
    "sis": (
        "Find every salient instance in the image, one by one. "
        + _FORMAT
        + " In the answer, name each salient instance with its own referring expression inside <ins></ins>, "
        "so that each expression picks out exactly one object."
        + _NOTHING
        + " Example: "
        + format_answer("...", instances=["the man on the left", "the man on the right"])
    ),
    "cosod": (
        "This group of {num_images} images shares a common salient object. "
        + _FORMAT
        + " In the answer, name the object they share with one referring expression inside <rg></rg>; "
        "it is segmented in every image of the group. Example: " + format_answer("...", regions=["the red apple"])
    ),
}


def build_prompt(task: str, num_images: int = 1) -> list[dict]:
    """Build the user turn for `task`; SOD and SIS take one image, CoSOD the whole group (at least one image)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if task != "cosod" and num_images != 1:
        raise ValueError(f"task {task!r} takes exactly one image, got num_images={num_images}")
    text = INSTRUCTIONS[task].format(num_images=num_images)
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]
