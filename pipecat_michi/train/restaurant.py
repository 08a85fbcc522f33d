"""The demo's domain: a small restaurant's phone line, as a closed grammar of sentences.

Open-vocabulary speech is out of reach of a speaking head trained for an hour on two CPU cores
(the everyday corpus has ~2000 words, most heard once or twice: the head never learns them). A
phone line's answers draw on a few hundred words, each heard hundreds of times in a corpus of
this grammar. The speaking head is trained on this domain and judged on sentences of the same
grammar that training never sees (``HELD_OUT_ANSWERS``: new combinations of the domain's words,
removed from every training draw), so its figure is in-domain, and says so.

Numbers are words: the bot speaks them, and its inner monologue spells them as it says them.
"""

from __future__ import annotations

import random

HOURS = ("five", "six", "seven", "eight", "nine", "ten", "eleven", "noon")
TIMES = HOURS[:-1] + ("half past six", "half past seven", "half past eight", "seven thirty", "eight thirty")
PARTY_SIZES = ("two", "three", "four", "five", "six", "eight", "ten")
DAYS = ("tonight", "today", "tomorrow", "on friday", "on saturday", "on sunday", "on monday", "this weekend")
DISHES = ("pizza", "pasta", "lasagna", "soup", "salad", "steak", "fish", "chicken", "risotto", "tiramisu",
          "ice cream", "garlic bread")
PRICES = ("nine", "twelve", "fifteen", "eighteen", "twenty", "twenty five")
NAMES = ("anna", "peter", "maria", "james", "sarah", "david", "laura", "tom")
STREETS = ("main street", "river road", "park avenue", "market square", "oak lane")

# The bot's side of the line: answers, confirmations and questions back.
ANSWER_TEMPLATES = (
    "We are open from {hour} to {hour} {day}.",
    "We open at {hour} and close at {hour}.",
    "The kitchen closes at {time} {day}.",
    "I have booked a table for {party} at {time} {day}.",
    "A table for {party} at {time} {day} is booked.",
    "Yes, we have a table for {party} at {time}.",
    "Sorry, we are full at {time}, but {time} is free.",
    "I can offer you a table for {party} at {time}.",
    "The {dish} costs {price} dollars.",
    "Our {dish} is {price} dollars and the {dish} is {price}.",
    "Tonight we have {dish}, {dish} and {dish}.",
    "Yes, the {dish} and the {dish} are vegetarian.",
    "We are on {street}, next to the park.",
    "You can find us on {street}.",
    "Our restaurant is on {street}, near the river.",
    "Thank you {name}, see you {day} at {time}.",
    "Your table for {party} is ready {day}, {name}.",
    "Can I have your name for the booking?",
    "How many people will be joining you?",
    "What time would you like to come {day}?",
    "Would you like a table inside or outside?",
    "Parking is free behind the restaurant.",
    "We are closed {day}, but we open at {hour} {day}.",
    "Yes, you can order {dish} to take away.",
    "The chef recommends the {dish} {day}.",
)
# The caller's side: what the listening head hears in the demo's scenario.
QUESTION_TEMPLATES = (
    "What time do you open {day}?",
    "When does the kitchen close {day}?",
    "Can I book a table for {party} at {time} {day}?",
    "Do you have a table for {party} {day}?",
    "How much is the {dish}?",
    "Do you have vegetarian {dish}?",
    "Where are you?",
    "Is there parking near the restaurant?",
    "Can I order {dish} to take away?",
    "My name is {name}, a table for {party} please.",
)

# What the demo's retrieval step injects into the call (text context, not training text): the
# restaurant's facts, worded in the domain's words so the bot can say them.
FACTS = (
    "Rosa's Kitchen is a small Italian restaurant on river road, next to the park.",
    "We are open from five to eleven, tuesday to sunday. We are closed on monday.",
    "The kitchen closes at half past ten.",
    "Tables can be booked by phone for up to ten people.",
    "Prices: pizza twelve dollars, pasta fifteen dollars, lasagna eighteen dollars, steak twenty five dollars, "
    "soup nine dollars, tiramisu nine dollars.",
    "Vegetarian dishes: the salad, the pasta and the risotto.",
    "Parking is free behind the restaurant.",
)

_SLOTS = {"hour": HOURS, "time": TIMES, "party": PARTY_SIZES, "day": DAYS, "dish": DISHES, "price": PRICES,
          "name": NAMES, "street": STREETS}

# Twenty bot answers the speaking head is judged on: the domain's words in combinations that no
# training draw contains (``restaurant_sentences`` drops them).
HELD_OUT_ANSWERS = (
    "We are open from five to eleven on sunday.",
    "We open at six and close at ten.",
    "The kitchen closes at half past eight tomorrow.",
    "I have booked a table for three at seven thirty on friday.",
    "A table for eight at six tonight is booked.",
    "Yes, we have a table for four at half past seven.",
    "Sorry, we are full at eight, but nine is free.",
    "I can offer you a table for six at eight thirty.",
    "The risotto costs eighteen dollars.",
    "Our soup is nine dollars and the steak is twenty five.",
    "Tonight we have lasagna, fish and tiramisu.",
    "Yes, the salad and the pasta are vegetarian.",
    "We are on river road, next to the park.",
    "You can find us on market square.",
    "Thank you maria, see you tomorrow at half past six.",
    "Your table for two is ready tonight, james.",
    "We are closed on monday, but we open at noon on saturday.",
    "Yes, you can order garlic bread to take away.",
    "The chef recommends the chicken this weekend.",
    "What time would you like to come on saturday?",
)


def fill(template: str, rng: random.Random) -> str:
    """One sentence of ``template``, each ``{slot}`` drawn on its own (a slot may repeat)."""
    parts = template.split("{")
    out = [parts[0]]
    for part in parts[1:]:
        slot, rest = part.split("}", 1)
        out.append(rng.choice(_SLOTS[slot]) + rest)
    return "".join(out)


def restaurant_sentences(count: int, seed: int = 0, answers_share: float = 0.8) -> list[str]:
    """``count`` draws from the grammar (bot answers ``answers_share`` of them, caller questions
    the rest), never one of ``HELD_OUT_ANSWERS``. Draws repeat: a template without slots is one
    sentence, and it is drawn as often as any other template."""
    rng = random.Random(seed)
    held_out = {s.lower() for s in HELD_OUT_ANSWERS}
    sentences: list[str] = []
    while len(sentences) < count:
        templates = ANSWER_TEMPLATES if rng.random() < answers_share else QUESTION_TEMPLATES
        sentence = fill(rng.choice(templates), rng)  # every template starts with its capital
        if sentence.lower() not in held_out:
            sentences.append(sentence)
    return sentences


def vocabulary(sentences: list[str]) -> set[str]:
    return {w.strip(".,?!").lower() for s in sentences for w in s.split()}
