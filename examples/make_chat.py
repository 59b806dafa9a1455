"""Writes examples/chat_sonnets.jsonl: a small chat set made from the Sonnets shipped with kdpipe, for
examples/chat.toml. Three conversations per sonnet, in `messages` records ({role, content}):

- "Recite Sonnet N." -> the sonnet's fourteen lines;
- "What line follows "<line i>" in Sonnet N?" -> line i+1 (i drawn per sonnet, seeded);
- two turns: "How does Sonnet N begin?" -> its first quatrain; "And how does it end?" -> its couplet.

    python examples/make_chat.py            # 462 conversations, deterministic
"""

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SONNETS = ROOT.parent / "kdpipe" / "data" / "sonnets.txt"


def sonnets() -> list[tuple[str, list[str]]]:
    """(roman numeral, lines) per sonnet: a numeral alone on a line heads the lines that follow."""
    found, name = [], None
    for block in re.split(r"\n\s*\n", SONNETS.read_text()):
        text = block.strip()
        if re.fullmatch(r"[IVXLC]+", text):
            name = text
        elif name and len(text.splitlines()) >= 12:
            found.append((name, [line.strip() for line in text.splitlines()]))
            name = None
    return found


def conversations(seed: int = 0) -> list[list[dict]]:
    rng, out = random.Random(seed), []
    for name, lines in sonnets():
        user = lambda text: {"role": "user", "content": text}  # noqa: E731
        bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
        out.append([user(f"Recite Sonnet {name}."), bot("\n".join(lines))])
        i = rng.randrange(len(lines) - 1)
        out.append([user(f'What line follows "{lines[i]}" in Sonnet {name}?'), bot(lines[i + 1])])
        out.append([user(f"How does Sonnet {name} begin?"), bot("\n".join(lines[:4])),
                    user("And how does it end?"), bot("\n".join(lines[-2:]))])
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    rows = conversations()
    with open(ROOT / "chat_sonnets.jsonl", "w") as f:
        for messages in rows:
            f.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {len(rows)} conversations to {ROOT / 'chat_sonnets.jsonl'}")
