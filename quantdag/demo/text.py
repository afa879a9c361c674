"""Deterministic generated prose: news articles (CNN/DailyMail-like) and encyclopedia text.

The two generators share no sentence template and no named entity: news names people, cities and
organisations from fixed lists, the encyclopedia names rivers, villages and species built from
syllables (never a news word), so text for evaluation is held out from text for calibration by
construction. All randomness comes from the `random.Random` passed in.
"""

from __future__ import annotations

import hashlib
import random

FIRST = "Maria James Aisha Chen Olga Tomas Priya Kwame Elena Diego Hana Samuel Fatima Lars Noor Ivan Grace".split()
LAST = "Okafor Lindqvist Moreau Tanaka Haddad Novak Fernandes Kowalski Mensah Oduya Brennan Castillo Petrov".split()
CITIES = "London Lagos Mumbai Toronto Nairobi Lisbon Osaka Lima Warsaw Cairo Denver Hanoi Oslo Seville Manila".split()
ORGS = [
    "the city council",
    "the health ministry",
    "a regional court",
    "the central bank",
    "the transport agency",
    "a university hospital",
    "the port authority",
    "the national weather service",
    "an energy company",
    "the football federation",
    "a consumer group",
    "the election commission",
    "the fire department",
]
ROLES = "a spokesperson|an economist|an engineer|a nurse|an analyst|a teacher|a farmer|a researcher|a lawyer".split("|")
TOPICS = [
    ("flooding", "rainfall", "residents"),
    ("a rail strike", "commuters", "delays"),
    ("rising food prices", "households", "inflation"),
    ("a new vaccine programme", "clinics", "doses"),
    ("a bridge closure", "drivers", "repairs"),
    ("the harvest", "farmers", "exports"),
    ("a data breach", "customers", "passwords"),
    ("the marathon", "runners", "volunteers"),
    ("a heatwave", "hospitals", "temperatures"),
    ("school funding", "teachers", "classrooms"),
    ("a wildfire", "firefighters", "evacuations"),
    ("the port expansion", "shipping lines", "containers"),
]
VERBS = "said warned announced confirmed estimated argued reported insisted acknowledged explained".split()
ADJ = "sharp unexpected modest severe gradual record-breaking temporary lasting costly welcome".split()
NEWS_SENTENCES = [
    "{who}, {role} in {city}, {verb} that {topic} had affected about {num} {group} since {month}.",
    "Officials from {org} {verb} on {day} that a {adj} rise in {thing} was likely this year.",
    '"We have never seen anything like this," {who} told reporters outside {org_short} headquarters.',
    "According to {org}, the cost of dealing with {topic} could reach ${num} million by {month}.",
    "Many {group} in {city} {verb} that the response to {topic} had been too slow.",
    "The {adj} change came after {num} {group} signed a petition calling for action on {thing}.",
    "{who} {verb} that {org} would publish a full report on {topic} before the end of {month}.",
    "Critics said the plan did little for {group}, while supporters called it a {adj} first step.",
    "In {city}, {num} {group} gathered on {day} to hear {who} speak about {thing}.",
    "The figures, released by {org}, show that {thing} fell by {pct} percent over the past year.",
    "{who}, who has worked as {role} for {small} years, {verb} that the numbers were {adj}.",
    "Police in {city} {verb} that no one had been seriously hurt, although {small} people were treated.",
    "Talks between {org} and representatives of {group} are expected to resume on {day}.",
    "Analysts {verb} that {topic} could push {thing} up by as much as {pct} percent.",
]
MONTHS = "January February March April May June July August September October November December".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()

# Encyclopedia side: syllables that form names no news word matches.
_SYL = "ka lo ve ri su ban tor mel qui dra zen fo har ul ni gos tev ar".split()
PAGE_KINDS = [("river", "flows", "basin"), ("village", "lies", "parish"), ("lighthouse", "stands", "headland")]
"""Subjects of the rendered wiki pages (image-text mirror)."""
EVAL_KINDS = [("moth", "is found", "genus"), ("glacier", "descends", "massif"), ("fern", "grows", "family")]
"""Subjects of the evaluation text; every encyclopedia sentence names its kind, so none can repeat."""
WIKI_SENTENCES = [
    "The {name} {kind} {lives} in the {region} {place} , at an elevation of {num} metres .",
    "The {kind} was first described in {year} by the surveyor {name2} , who noted its {feature} .",
    "The {place} covers an area of {num} @,@ {small}00 square kilometres and contains {small} {kind}s .",
    "Local records from {year} mention the {kind} under the older name {name2} .",
    "Its {feature} distinguishes it from the neighbouring {name2} {kind} .",
    "During the {century} century the {place} around the {kind} was divided into {small} districts .",
    "A survey of the {kind} in {year} gave a figure of {num} @.@ {small} .",
    "The {kind} is listed in the {region} inventory as item {num} .",
]
FEATURES = "pale colouring|steep northern face|narrow channel|double spire|banded wings|shallow lake".split("|")
REGIONS = "upper lower eastern western central coastal highland".split()


def _name(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_SYL) for _ in range(syllables)).capitalize()


def _fill(template: str, rng: random.Random, fields: dict[str, str]) -> str:
    values = dict(fields)
    values.update(
        num=str(rng.randint(12, 980)),
        small=str(rng.randint(2, 9)),
        pct=str(rng.randint(2, 45)),
        month=rng.choice(MONTHS),
        day=rng.choice(DAYS),
        adj=rng.choice(ADJ),
        verb=rng.choice(VERBS),
        year=str(rng.randint(1780, 1990)),
        century=rng.choice(["eighteenth", "nineteenth", "twentieth"]),
    )
    return template.format(**values)


def news_article(rng: random.Random) -> dict[str, str]:
    r"""Generate one record in the `abisee/cnn_dailymail` 3.0.0 schema.

    Returns:
        `{"article": str (about 250-450 words), "highlights": str (3 lines joined by "\\n"),
        "id": str (40 hex digits, the SHA-1 of the article, like the dataset's ids)}`.
    """
    city = rng.choice(CITIES)
    topic, group, thing = rng.choice(TOPICS)
    people = [f"{rng.choice(FIRST)} {rng.choice(LAST)}" for _ in range(3)]
    org = rng.choice(ORGS)
    fields = {"city": city, "topic": topic, "group": group, "thing": thing, "org": org}
    fields["org_short"] = org.removeprefix("the ").removeprefix("a ").removeprefix("an ")
    lede = {**fields, "who": people[0], "role": rng.choice(ROLES)}
    sentences = [_fill(NEWS_SENTENCES[i], rng, lede) for i in (0, 6, 4)]  # the facts the highlights repeat
    for _ in range(rng.randint(13, 23)):
        fields.update(who=rng.choice(people), role=rng.choice(ROLES))
        sentences.append(_fill(rng.choice(NEWS_SENTENCES), rng, fields))
    paragraphs = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
    article = f"{city.upper()} (CNN) -- " + "\n\n".join(paragraphs)
    highlights = "\n".join(
        [
            f"{topic.capitalize()} has affected {group} in {city}, says {people[0]} .",
            f"{org.capitalize()} is to publish a full report on {topic} .",
            f"Many {group} say the response has been too slow .",
        ]
    )
    return {"article": article, "highlights": highlights, "id": hashlib.sha1(article.encode()).hexdigest()}


def plain(wikitext: str) -> str:
    """Undo WikiText's tokenised spacing for display: "4 @.@ 5 km , ." -> "4.5 km,."."""
    for before, after in ((" @.@ ", "."), (" @,@ ", ","), (" @-@ ", "-"), (" ,", ","), (" .", ".")):
        wikitext = wikitext.replace(before, after)
    return wikitext


def wiki_article(rng: random.Random, paragraphs: int, kinds: list[tuple[str, str, str]]) -> tuple[str, list[str]]:
    """Generate an encyclopedia entry: a title and `paragraphs` paragraphs of 3-6 sentences.

    Args:
        rng: Source of randomness.
        paragraphs: Number of paragraphs, >= 1.
        kinds: `(kind, verb, place)` subjects to draw from: `PAGE_KINDS` or `EVAL_KINDS`.

    Returns:
        `(title, paragraphs)`; sentences use WikiText's spacing (" , ", " @.@ ").
    """
    kind, lives, place = rng.choice(kinds)
    name = _name(rng)
    title = f"{name} {kind}".title() if rng.random() < 0.5 else name
    body = []
    for _ in range(paragraphs):
        fields = {"name": name, "kind": kind, "lives": lives, "place": place, "region": rng.choice(REGIONS)}
        text = []
        for _ in range(rng.randint(3, 6)):
            fields.update(name2=_name(rng, 2), feature=rng.choice(FEATURES))
            text.append(_fill(rng.choice(WIKI_SENTENCES), rng, fields))
        body.append(" ".join(text))
    return title, body
