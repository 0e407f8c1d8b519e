"""Reward functions for the RL tests, with TRL's signature f(prompts, completions, **columns) -> list[float]."""


def glad(prompts, completions, **columns):
    """The share of words that are 'glad' or 'help' (the test tokenizer's words), None for an empty completion."""
    out = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[0]["content"]
        words = text.split()
        out.append(sum(w in ("glad", "help") for w in words) / len(words) if words else None)
    return out


def prompt_length(prompts, completions, id, **columns):
    """Reads a dataset column (`id`) as TRL passes the others: one value per completion."""
    assert len(id) == len(completions)
    return [float(len(p)) / 100 for p in prompts]
