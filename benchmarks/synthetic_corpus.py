"""Write a synthetic frwiki Structured-Contents JSONL of realistic French articles (seeded).

The embedded default corpus for `just demo`, the fixtures of the tests and the input of the
benchmarks. Lines have the real shape: nested sections (an "Abstract" lead), paragraphs with links
(some with links and no value), lists whose parent items repeat their nested items, infoboxes,
metadata that varies from line to line, and article lengths from one line to hundreds of paragraphs.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import orjson

from pipeline.manifest import atomic_path

PRENOMS = ["Jean", "Marie", "Pierre", "Louise", "Jacques", "Anne", "Henri", "Camille", "Louis", "Jeanne", "Paul",
           "Marguerite", "François", "Hélène", "Étienne", "Céline", "Gabriel", "Élise", "Antoine", "Joséphine",
           "Théodore", "Geneviève", "Hugues", "Brigitte", "Aurélien", "Noémie", "Rémi", "Océane", "Benoît", "Adèle"]
NOMS = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
        "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier",
        "Morel", "Girard", "André", "Lefebvre", "Mercier", "Dupont", "Lambert", "Bonnet", "François", "Martinez",
        "Chevalier", "Gauthier", "Perrin", "Clément", "Faure", "Rousseau", "Blanchard", "Guérin", "Boyer", "Lemaître"]
VILLES = ["Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Nantes", "Strasbourg", "Lille", "Rennes", "Reims",
          "Montpellier", "Grenoble", "Dijon", "Angers", "Nîmes", "Brest", "Limoges", "Tours", "Amiens", "Metz",
          "Besançon", "Orléans", "Rouen", "Caen", "Nancy", "Avignon", "Poitiers", "Pau", "La Rochelle", "Béziers"]
REGIONS = ["Bretagne", "Normandie", "Occitanie", "Provence-Alpes-Côte d'Azur", "Auvergne-Rhône-Alpes", "Grand Est",
           "Hauts-de-France", "Nouvelle-Aquitaine", "Bourgogne-Franche-Comté", "Centre-Val de Loire", "Île-de-France",
           "Pays de la Loire", "Corse"]
PAYS = ["France", "Belgique", "Suisse", "Canada", "Italie", "Espagne", "Allemagne", "Portugal", "Maroc", "Sénégal",
        "Québec", "Luxembourg", "Tunisie", "Grèce", "Autriche"]
RIVIERES = ["la Loire", "la Seine", "le Rhône", "la Garonne", "la Dordogne", "l'Yonne", "la Marne", "l'Oise",
            "la Vienne", "le Lot", "l'Allier", "la Moselle", "la Sarthe", "l'Aude", "l'Hérault"]
METIERS = ["peintre", "écrivain", "compositeur", "architecte", "homme politique", "physicienne", "sculpteur",
           "poète", "historien", "mathématicienne", "chanteuse", "cinéaste", "botaniste", "philosophe", "avocat"]
DOMAINES = ["la peinture", "la littérature", "la musique", "l'architecture", "la politique", "la physique",
            "la sculpture", "la poésie", "l'histoire", "les mathématiques", "la chanson", "le cinéma", "la botanique"]
ADJECTIFS = ["importante", "célèbre", "ancienne", "remarquable", "principale", "nouvelle", "grande", "petite",
             "première", "dernière", "longue", "courte", "riche", "modeste", "vaste"]
ORGANISMES = ["l'Académie française", "l'université de Paris", "le Conseil d'État", "l'Assemblée nationale",
              "le musée du Louvre", "l'Institut Pasteur", "le Centre national de la recherche scientifique",
              "la Bibliothèque nationale de France", "l'Opéra de Paris", "la Comédie-Française"]
OEUVRES = ["Les Saisons", "Le Voyage d'hiver", "La Nuit étoilée", "Les Mémoires d'un village", "L'Aube rouge",
           "Le Chant du fleuve", "La Maison des collines", "Les Jardins du roi", "Le Dernier Été", "La Route du sel"]
SIECLES = ["XIIᵉ", "XIIIᵉ", "XIVᵉ", "XVᵉ", "XVIᵉ", "XVIIᵉ", "XVIIIᵉ", "XIXᵉ", "XXᵉ"]
MOIS = ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
        "novembre", "décembre"]
SECTIONS_COMMUNE = ["Géographie", "Toponymie", "Histoire", "Politique et administration", "Démographie",
                    "Économie", "Culture locale et patrimoine", "Personnalités liées à la commune"]
SOUS_SECTIONS = {"Géographie": ["Localisation", "Hydrographie", "Climat", "Voies de communication"],
                 "Histoire": ["Préhistoire et Antiquité", "Moyen Âge", "Époque moderne", "Révolution française",
                              "Époque contemporaine"],
                 "Culture locale et patrimoine": ["Lieux et monuments", "Patrimoine religieux", "Patrimoine naturel"],
                 "Économie": ["Agriculture", "Industrie", "Tourisme"]}
SECTIONS_PERSONNE = ["Biographie", "Jeunesse et formation", "Carrière", "Œuvre", "Style", "Postérité",
                     "Distinctions", "Vie privée"]


class ArticleWriter:
    """Seeded generator of article dicts in the Structured-Contents shape."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.next_id = 1000 + seed * 10_000_000

    def pick(self, items: list[str]) -> str:
        return self.rng.choice(items)

    def year(self, lo: int = 1100, hi: int = 2023) -> int:
        return self.rng.randint(lo, hi)

    def date(self) -> str:
        day = self.rng.randint(1, 28)
        return f"{'1ᵉʳ' if day == 1 else day} {self.pick(MOIS)} {self.year(1750)}"

    def person(self) -> str:
        return f"{self.pick(PRENOMS)} {self.pick(NOMS)}"

    def sentence(self, subject: str) -> str:
        r, p = self.rng, self.pick
        templates = [
            lambda: f"{subject} est située sur la rive {r.choice(['gauche', 'droite'])} de {p(RIVIERES)}, à "
                    f"{r.randint(3, 95)} km au {r.choice(['nord', 'sud', 'nord-est', 'sud-ouest', 'nord-ouest'])} "
                    f"de {p(VILLES)}.",
            lambda: f"En {self.year()}, {p(PRENOMS)} {p(NOMS)} y fonde une {p(ADJECTIFS)} abbaye, qui devient au "
                    f"{p(SIECLES)} siècle un centre de pèlerinage.",
            lambda: f"La population atteint {r.randint(120, 98000):,} habitants en {self.year(1793, 2021)}, soit une "
                    f"évolution de {r.uniform(-9, 12):+.1f} % par rapport à {self.year(1793, 1990)}.".replace(",", " "),
            lambda: f"Le climat y est de type {r.choice(['océanique', 'continental', 'méditerranéen', 'montagnard'])}"
                    f", avec une température moyenne annuelle de {r.uniform(8, 16):.1f} °C et des précipitations de "
                    f"{r.randint(500, 1400)} mm par an.",
            lambda: f"Selon {self.person()}, le nom de la localité dériverait du latin « {p(['villa', 'castrum', 'fons', 'mons', 'campus'])} "
                    f"{p(['Aurelii', 'Martini', 'Sancti', 'Rubei', 'Longi'])} », attesté sous la forme {p(NOMS)}iacum en "
                    f"{self.year(800, 1300)}.",
            lambda: f"{self.person()} ({self.year(1600, 1900)}-{self.year(1901, 1990)}), {p(METIERS)}, y est né le "
                    f"{self.date()}.",
            lambda: f"Durant la guerre de {p(['Cent Ans', 'Trente Ans', 'Succession d’Espagne', 'Sept Ans'])}, la "
                    f"ville est assiégée à plusieurs reprises et perd près d'un tiers de ses habitants.",
            lambda: f"L'économie repose principalement sur {p(['la viticulture', 'l’élevage bovin', 'le tourisme', 'l’industrie textile', 'la pêche', 'les services'])}"
                    f", qui emploie {r.randint(5, 60)} % de la population active.",
            lambda: f"Il étudie {p(DOMAINES)} à {p(VILLES)} auprès de {self.person()}, puis s'installe à {p(VILLES)} "
                    f"en {self.year(1700, 2000)}.",
            lambda: f"Son œuvre la plus connue, {p(OEUVRES)}, est présentée pour la première fois en {self.year(1700, 2010)} "
                    f"et reçoit un accueil {p(['enthousiaste', 'mitigé', 'critique', 'chaleureux'])}.",
            lambda: f"Elle est élue à {p(ORGANISMES)} le {self.date()}, où elle succède à {self.person()}.",
            lambda: f"Le {self.date()}, le conseil municipal vote la construction d'une {p(['école', 'mairie', 'halle', 'gare', 'bibliothèque'])} "
                    f"pour un montant de {r.randint(10, 900)} 000 francs.",
            lambda: f"L'église Saint-{p(PRENOMS)}, construite au {p(SIECLES)} siècle, est classée monument historique "
                    f"depuis {self.year(1840, 2010)}.",
            lambda: f"La commune fait partie de l'arrondissement de {p(VILLES)} et du canton de {p(VILLES)}-"
                    f"{p(['Nord', 'Sud', 'Est', 'Ouest', 'Centre'])}, dans la région {p(REGIONS)}.",
            lambda: f"De {self.year(1900, 1960)} à {self.year(1961, 2020)}, {self.person()} "
                    f"({p(['PS', 'LR', 'divers gauche', 'divers droite', 'UDF', 'RPR', 'sans étiquette'])}) en est le maire.",
            lambda: f"Les travaux de {self.person()} ont montré que la formule {{\\displaystyle x^{{{r.randint(2, 5)}}}+y="
                    f"{r.randint(1, 9)}}} admet une solution unique.",
            lambda: f"Le {p(['festival', 'marché', 'pèlerinage', 'carnaval'])} annuel attire chaque {p(MOIS)} près de "
                    f"{r.randint(2, 80)} 000 visiteurs venus de {p(PAYS)} et de {p(PAYS)}.",
            lambda: f"« {p(['Je ne regrette rien', 'La beauté sauvera le monde', 'Rien ne se perd', 'Tout est à refaire'])} », "
                    f"aurait-{r.choice(['il', 'elle'])} déclaré en {self.year(1800, 2000)}.",
        ]
        return r.choice(templates)()

    def paragraph(self, subject: str, sentences: tuple[int, int] = (1, 6)) -> dict:
        text = " ".join(self.sentence(subject) for _ in range(self.rng.randint(*sentences)))
        part = {"type": "paragraph", "value": text}
        if self.rng.random() < 0.85:  # Wikipedia paragraphs link heavily: a few links per sentence
            targets = [self.pick(VILLES + PAYS + REGIONS + METIERS) for _ in range(self.rng.randint(1, 3 * len(text) // 150 + 1))]
            part["links"] = [{"url": f"https://fr.wikipedia.org/wiki/{t.replace(' ', '_')}", "text": t} for t in targets]
        return part

    def item_list(self, subject: str) -> dict:
        """A list whose parent items contain their nested items, repeated as items (the dump's shape)."""
        items = []
        for _ in range(self.rng.randint(2, 6)):
            if self.rng.random() < 0.3:
                children = [f"{self.year()} : {self.pick(OEUVRES)}" for _ in range(self.rng.randint(2, 3))]
                items.append({"type": "list_item", "value": f"{self.person()} : " + " ".join(children)})
                items.extend({"type": "list_item", "value": child} for child in children)
            else:
                items.append({"type": "list_item", "value": self.sentence(subject)})
        return {"type": "list", "has_parts": items}

    def section(self, name: str, subject: str, depth: int, size: int) -> dict:
        parts: list[dict] = [self.paragraph(subject) for _ in range(max(1, size))]
        r = self.rng
        if r.random() < 0.25:
            parts.append(self.item_list(subject))
        if r.random() < 0.05:
            parts.append({"type": "paragraph", "links": [{"url": "https://fr.wikipedia.org/wiki/France", "text": "France"}]})
        if depth < 4 and name in SOUS_SECTIONS and r.random() < 0.7:
            for sub in r.sample(SOUS_SECTIONS[name], r.randint(1, len(SOUS_SECTIONS[name]))):
                parts.append(self.section(sub, subject, depth + 1, r.randint(1, 3)))
        elif depth < 3 and r.random() < 0.15:
            parts.append(self.section(f"{name} ({self.pick(SIECLES)} siècle)", subject, depth + 1, r.randint(1, 2)))
        return {"type": "section", "name": name, "has_parts": parts}

    def article(self) -> dict:
        r = self.rng
        self.next_id += r.randint(1, 40)
        if r.random() < 0.5:
            title = f"{self.pick(['Saint-', 'Villeneuve-', 'Mont-', 'Beau', 'Châtel', ''])}{self.pick(NOMS)}" + \
                    (f"-sur-{self.pick(['Loire', 'Seine', 'Marne', 'Mer', 'Oise'])}" if r.random() < 0.3 else "")
            subject, headings = title, SECTIONS_COMMUNE
            lead = f"{title} est une commune française située dans la région {self.pick(REGIONS)}."
        else:
            title = self.person()
            subject, headings = title, SECTIONS_PERSONNE
            lead = (f"{title}, né le {self.date()} à {self.pick(VILLES)} et mort le {self.date()} à "
                    f"{self.pick(VILLES)}, est un {self.pick(METIERS)} {self.pick(['français', 'belge', 'suisse', 'québécois'])}.")
        scale = r.lognormvariate(0.6, 1.0)  # most articles short, a long tail of very long ones
        sections = [{"type": "section", "name": "Abstract",
                     "has_parts": [{"type": "paragraph", "value": lead}] +
                                  [self.paragraph(subject) for _ in range(r.randint(0, 2))]}]
        if r.random() > 0.015:  # about 1.5% of articles have no section beyond a lead... or nothing at all
            for name in r.sample(headings, min(len(headings), 1 + int(scale * 2))):
                sections.append(self.section(name, subject, 1, 1 + int(scale * r.random() * 3)))
        else:
            sections = [{"type": "section", "name": "Abstract", "has_parts": [{"type": "image"}]}]
        article = {"name": title, "identifier": self.next_id,
                   "url": f"https://fr.wikipedia.org/wiki/{title.replace(' ', '_')}",
                   "date_modified": f"2024-0{r.randint(1, 9)}-{r.randint(10, 28)}T0{r.randint(0, 9)}:12:00Z",
                   "version": {"identifier": r.randint(10**8, 3 * 10**8), "number_of_characters": r.randint(100, 90000),
                               "size": {"value": r.randint(100, 90000), "unit_text": "B"}},
                   "in_language": {"identifier": "fr"},
                   "is_part_of": {"identifier": "frwiki", "url": "https://fr.wikipedia.org"},
                   "license": [{"name": "Creative Commons Attribution-ShareAlike License 4.0",
                                "identifier": "CC-BY-SA-4.0", "url": "https://creativecommons.org/licenses/by-sa/4.0/"}],
                   "sections": sections}
        if r.random() < 0.4:
            article["date_created"] = f"20{r.randint(2, 23):02d}-01-01T00:00:00Z"
        if r.random() < 0.3:
            article["main_entity"] = {"identifier": f"Q{r.randint(1, 10**7)}", "url": "https://www.wikidata.org/"}
        if r.random() < 0.2:
            article["infoboxes"] = [{"type": "infobox", "name": "Infobox Commune", "has_parts": [
                {"type": "field", "name": "Pays", "value": "France"}]}]
        return article


def write_corpus(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Write articles until the file reaches `target_bytes`; return the number of lines."""
    writer = ArticleWriter(seed)
    lines = written = 0
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        while written < target_bytes:
            line = orjson.dumps(writer.article()) + b"\n"
            f.write(line)
            written += len(line)
            lines += 1
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--megabytes", type=float, default=20.0, help="approximate size to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")


def run(args: argparse.Namespace) -> int:
    lines = write_corpus(args.output, int(args.megabytes * 1e6), args.seed)
    print(f"make-corpus: {lines:,} articles -> {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import command_line

    return command_line("just make-corpus", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
