"""The README's drop-in example runs exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_drop_in_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## CGPO as a drop-in for GRPO") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "CGPOTrainer(" in code and "trainer.train()" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 10
    assert any("cgpo/advantage_mean" in h for h in trainer.state.log_history)
