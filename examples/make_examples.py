"""Write the example datasets (pirate chat, contacts prompt/completion, Alpaca sample, held-out sets) next to this file."""

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

# --- Pirate chat dataset -----------------------------------------------------

QA: list[tuple[str, str]] = [
    # science
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters far more than red, so blue fills the sky."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit."),
    ("What is the chemical formula for water?", "It is H2O: two hydrogen atoms bonded to one oxygen atom."),
    ("How many planets are in our solar system?", "There are eight: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet, about eleven times wider than Earth."),
    ("What causes the seasons on Earth?", "Earth's axis is tilted about 23.5 degrees, so each hemisphere gets more direct sunlight at different times of year."),
    ("What do plants need for photosynthesis?", "Plants use sunlight, water and carbon dioxide to make sugar, releasing oxygen as a by-product."),
    ("How long does sunlight take to reach Earth?", "Sunlight takes about 8 minutes and 20 seconds to reach Earth."),
    ("What is the speed of light?", "Light travels about 300,000 kilometers per second in a vacuum."),
    ("What is gravity?", "Gravity is the force that pulls masses toward each other; it keeps you on the ground and the Moon in orbit."),
    ("What gas do humans breathe out?", "Humans breathe out carbon dioxide, which the body makes when it burns food for energy."),
    ("What is the closest star to Earth?", "The Sun is the closest star; the next nearest is Proxima Centauri, about 4.2 light-years away."),
    ("What is DNA?", "DNA is the molecule that carries the genetic instructions for growth, function and reproduction of living things."),
    ("Why does the Moon have phases?", "As the Moon orbits Earth, we see different portions of its sunlit half, which creates the phases."),
    ("What is the hardest natural substance?", "Diamond, a form of pure carbon, is the hardest natural substance."),
    ("What are the three states of matter?", "The classic three are solid, liquid and gas; plasma is often counted as a fourth."),
    ("What causes thunder?", "Lightning heats the air so fast that it expands explosively, and that shock wave is the thunder you hear."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones."),
    ("What is the largest organ of the human body?", "The skin is the largest organ of the human body."),
    # geography
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra, not Sydney."),
    ("What is the longest river in the world?", "The Nile is usually named the longest at about 6,650 km, though some measurements put the Amazon slightly ahead."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest, at 8,849 meters above sea level."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest, covering about a third of Earth's surface."),
    ("What is the largest desert in the world?", "Antarctica is the largest desert overall; the Sahara is the largest hot desert."),
    ("How many continents are there?", "There are seven: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("Which country has the largest population?", "India has the largest population, having passed China in 2023."),
    ("What is the smallest country in the world?", "Vatican City is the smallest country, at about 0.44 square kilometers."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Where is the Great Barrier Reef?", "The Great Barrier Reef lies off the coast of Queensland in northeastern Australia."),
    ("What is the largest country by area?", "Russia is the largest country by area."),
    ("What language is spoken in Brazil?", "The official language of Brazil is Portuguese."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("Which ocean lies between Europe and North America?", "The Atlantic Ocean lies between Europe and North America."),
    # cooking
    ("How do I boil an egg?", "Lower the egg into boiling water for 6 to 7 minutes for a soft yolk or 10 to 12 for hard-boiled, then cool it in cold water."),
    ("How do I cook white rice?", "Rinse the rice, add about one and a half cups of water per cup, bring to a boil, then cover and simmer on low for about 18 minutes."),
    ("How long should I rest a steak after cooking?", "Rest a steak for about 5 to 10 minutes so the juices settle back into the meat."),
    ("Why do onions make you cry?", "Cutting an onion releases a sulfur gas that irritates your eyes, so they make tears to wash it away."),
    ("What is the safe internal temperature for chicken?", "Chicken is safe at an internal temperature of 74 degrees Celsius, or 165 degrees Fahrenheit."),
    ("How do I make a basic vinaigrette?", "Whisk about three parts oil with one part vinegar, then season with salt, pepper and a little mustard."),
    ("How can I keep a cut avocado from browning?", "Brush the cut side with lemon or lime juice and wrap it tightly to keep air away."),
    ("What does baking soda do in baking?", "Baking soda reacts with acids to release carbon dioxide bubbles, which make dough and batter rise."),
    ("How do I cook pasta?", "Boil plenty of salted water, add the pasta, stir, cook until al dente as the package says, then drain."),
    ("How can I tell if an egg is fresh?", "Put it in a bowl of water: a fresh egg sinks and lies flat, while an old egg floats."),
    ("What is the difference between baking soda and baking powder?", "Baking soda is pure sodium bicarbonate and needs an acid to work; baking powder already contains the acid."),
    ("How do I stop a pot of pasta from boiling over?", "Use a large pot, do not fill it too high, and turn the heat down a little once it boils."),
    # tech
    ("What is a computer virus?", "A computer virus is a malicious program that copies itself and spreads between computers, often damaging files or stealing data."),
    ("How do I take a screenshot on Windows?", "Press Windows + Shift + S to capture an area, or press Print Screen to capture the whole screen."),
    ("What does CPU stand for?", "CPU stands for Central Processing Unit, the chip that runs a computer's instructions."),
    ("What is the difference between RAM and storage?", "RAM is fast, temporary memory for running programs; storage like an SSD keeps your files even when the power is off."),
    ("How can I make a strong password?", "Use a long passphrase of at least 12 characters, a different one for each site, and keep them in a password manager."),
    ("What is Wi-Fi?", "Wi-Fi is wireless networking that uses radio waves to connect devices to a local network and the internet."),
    ("What does URL stand for?", "URL stands for Uniform Resource Locator, which is the address of a web page."),
    ("How do I restart a frozen computer?", "First try closing the stuck program; if nothing responds, hold the power button for about ten seconds, then turn it back on."),
    ("What is the cloud in computing?", "The cloud means using servers over the internet to store your data and run software instead of your own machine."),
    ("What is two-factor authentication?", "Two-factor authentication asks for a second proof, such as a code on your phone, in addition to your password."),
    ("What does HTML stand for?", "HTML stands for HyperText Markup Language, the language used to structure web pages."),
    ("Why should I update my software?", "Updates fix security holes and bugs, and they often add new features."),
    # health
    ("How much water should I drink a day?", "A common guideline is about 2 to 3 liters of fluids a day for adults, more in hot weather or when exercising."),
    ("How many hours of sleep do adults need?", "Most adults need 7 to 9 hours of sleep a night."),
    ("Why is exercise good for you?", "Exercise strengthens your heart and muscles, lifts your mood and lowers the risk of many diseases."),
    ("What is a normal resting heart rate?", "A normal resting heart rate for adults is 60 to 100 beats per minute."),
    ("How long should I wash my hands?", "Wash your hands with soap and water for at least 20 seconds."),
    ("What does vitamin C do?", "Vitamin C helps heal wounds, supports the immune system and helps the body absorb iron."),
    ("What is a normal body temperature?", "Normal body temperature is about 37 degrees Celsius, or 98.6 degrees Fahrenheit."),
    ("Why do we need sunscreen?", "Sunscreen blocks ultraviolet rays, which cause sunburn, skin aging and skin cancer."),
    ("How much exercise do adults need each week?", "Adults should get at least 150 minutes of moderate activity a week, plus muscle training twice a week."),
    # history
    ("Who was the first president of the United States?", "George Washington was the first president, serving from 1789 to 1797."),
    ("When did World War II end?", "World War II ended in 1945: Germany surrendered in May and Japan in September."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was first, on July 20, 1969, during the Apollo 11 mission."),
    ("Who invented the telephone?", "Alexander Graham Bell is credited with inventing the telephone and patented it in 1876."),
    ("When did the Berlin Wall fall?", "The Berlin Wall fell on November 9, 1989."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in the early 1500s."),
    ("Who built the pyramids of Giza?", "Ancient Egyptian workers built them about 4,500 years ago as tombs for pharaohs."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet in the 1590s."),
    ("When did Columbus first reach the Americas?", "Christopher Columbus first reached the Americas in 1492."),
    ("What was the Renaissance?", "The Renaissance was a revival of art, science and learning in Europe from about the 14th to 17th century, starting in Italy."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928."),
    # animals
    ("What is the largest animal on Earth?", "The blue whale is the largest animal, growing up to about 30 meters long."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal, reaching about 100 kilometers per hour in short bursts."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Are whales fish?", "No, whales are mammals: they breathe air, are warm-blooded and feed their young milk."),
    ("Why do cats purr?", "Cats often purr when content, but also to soothe themselves when stressed or hurt."),
    ("How long do dogs live?", "Most dogs live 10 to 13 years, and small breeds usually live longer than large ones."),
    ("Do fish sleep?", "Yes, fish rest in a sleep-like state where they slow down, even though most have no eyelids."),
    ("What do bees make?", "Bees make honey from flower nectar, and they also produce beeswax."),
    ("How do birds fly?", "A bird's wings are shaped to create lift as air flows over them, flapping gives thrust, and light bones help."),
    ("What is the tallest animal?", "The giraffe is the tallest animal, reaching about 5.5 meters."),
    ("How many hearts does an octopus have?", "An octopus has three hearts."),
    # math
    ("What is the value of pi?", "Pi is about 3.14159; it is the ratio of a circle's circumference to its diameter."),
    ("What is 15 percent of 200?", "15 percent of 200 is 30."),
    ("What is a prime number?", "A prime number is a whole number above 1 divisible only by 1 and itself, like 2, 3, 5 and 7."),
    ("How many degrees are in a triangle?", "The angles of a triangle always add up to 180 degrees."),
    ("What is the square root of 144?", "The square root of 144 is 12."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("How do I calculate the area of a circle?", "Multiply pi by the radius squared: area equals pi times r squared."),
    ("How many seconds are in an hour?", "There are 3,600 seconds in an hour."),
]

PIRATE_HELDOUT: list[str] = [
    "What is the capital of Japan?",
    "How many days are in a leap year?",
    "What is the chemical symbol for gold?",
    "Who wrote Hamlet?",
    "Why do leaves change color in autumn?",
    "How do I make a cup of tea?",
    "What does GPS stand for?",
    "How many minutes are in a day?",
    "What is the largest land animal?",
    "Why is the ocean salty?",
    "How can I fall asleep faster?",
    "What is the main ingredient in guacamole?",
]

QUESTION_TEMPLATES = [
    "{q}",
    "Quick question: {q}",
    "I've always wondered about this. {q}",
    "Can you help me out? {q}",
    "Hey there! {q}",
    "Settle a debate for me: {q}",
]

LEADS = [
    "Aye, that be a fine question, me hearty.",
    "Listen close, ye landlubber.",
    "Gather 'round the ship's wheel, me hearty, for ye be in luck.",
    "Aye, even the cabin boy on me ship knows this one.",
    "This be knowledge worth more than buried treasure, aye.",
    "Aye, I learned this sailin' the seven seas.",
]

CLOSERS = [
    "Stow that treasure in yer noggin, me hearty. Yo ho ho!",
    "Now back to swabbin' the deck of me ship. Yo ho ho!",
    "May the sea winds fill yer sails, ye scallywag. Yo ho ho!",
    "That be the truth, sure as the sea be salty. Yo ho ho!",
    "Guard it like treasure in me ship's hold, aye. Yo ho ho!",
    "Aye, ye be wiser now, me hearty, so set sail. Yo ho ho!",
]

PIRATE_WORDS = {"you": "ye", "your": "yer", "You": "Ye", "Your": "Yer"}


def piratify(text: str) -> str:
    """Swap plain pronouns for pirate ones, keeping the facts intact."""
    return re.sub(r"\b(?:you|your|You|Your)\b", lambda m: PIRATE_WORDS[m.group(0)], text)


def make_pirate(rng: random.Random) -> list[dict]:
    examples = []
    for question, fact in QA:
        for template in rng.sample(QUESTION_TEMPLATES, 3):
            answer = f"Arr, matey! {rng.choice(LEADS)} {piratify(fact)} {rng.choice(CLOSERS)}"
            messages = [
                {"role": "user", "content": template.format(q=question)},
                {"role": "assistant", "content": answer},
            ]
            examples.append({"messages": messages})
    rng.shuffle(examples)
    return examples


# --- Contacts extraction dataset ---------------------------------------------

FIRST_NAMES = [
    "Maria", "Tom", "Aisha", "Kenji", "Lucía", "Oliver", "Priya", "Mateo", "Sofia", "Liam",
    "Chen", "Fatima", "Noah", "Elena", "Kwame", "Hannah", "Diego", "Yuki", "Omar", "Ingrid",
    "Rahul", "Chloe", "Pierre", "Amara", "Lars", "Nadia", "Samuel", "Zoë", "Ivan", "Leila",
    "Marco", "Grace", "Tariq", "Emma", "Jonas", "Mei", "Daniel", "Ana", "Felix", "Rosa",
]
LAST_NAMES = [
    "Lopez", "Becker", "Khan", "Tanaka", "Fernández", "Smith", "Patel", "Rossi", "Novak", "O'Brien",
    "Wang", "Haddad", "Johnson", "Petrova", "Mensah", "Schmidt", "Garcia", "Sato", "Nasser", "Larsen",
    "Sharma", "Dubois", "Okafor", "Nilsson", "Kowalski", "Müller", "Costa", "Murphy", "Kim", "Nguyen",
    "Silva", "Jensen", "Brown", "Moreau", "Yilmaz", "Andersen", "Cohen", "Walker", "Romano", "Hughes",
]
HELDOUT_FIRST_NAMES = ["Beatriz", "Henrik", "Inés", "Kofi", "Magnus", "Noor", "Paolo", "Renata", "Søren", "Thandiwe"]
HELDOUT_LAST_NAMES = ["Alvarez", "Bergström", "Castillo", "Delgado", "Eriksen", "Fischer", "Gallo", "Horvat", "Ibrahim", "Jovanović"]
CITIES = [
    "Madrid", "Oslo", "Tokyo", "Toronto", "Lagos", "Berlin", "São Paulo", "Mumbai", "Chicago", "Paris",
    "Sydney", "Cairo", "Seoul", "Nairobi", "Lisbon", "Dublin", "Vienna", "Prague", "Zürich", "Kraków",
    "Mexico City", "Buenos Aires", "Istanbul", "Bangkok", "Vancouver", "Melbourne", "Amsterdam", "Stockholm", "Athens", "Warsaw",
    "Boston", "Denver", "Manila", "Lima", "Cape Town", "Helsinki", "Rome", "Edinburgh", "Montreal", "Osaka",
]
JOBS = [
    "nurse", "carpenter", "software engineer", "teacher", "architect", "electrician", "accountant", "chef",
    "graphic designer", "pharmacist", "dentist", "journalist", "firefighter", "librarian", "photographer",
    "plumber", "lawyer", "veterinarian", "pilot", "barista", "mechanic", "data analyst", "physiotherapist",
    "baker", "translator", "police officer", "farmer", "civil engineer", "musician", "paramedic", "economist",
    "real estate agent", "tailor", "web developer", "social worker", "optometrist", "florist",
    "marine biologist", "welder", "bus driver",
]

# {a_job}: "a nurse" / "an architect"; {a_age}: "a 34-year-old" / "an 18-year-old"
TRAIN_TEMPLATES = [
    "{name}, {age}, is {a_job} in {city}.",
    "Meet {name}: {a_age} {job} from {city}.",
    "{name} is {age} years old, lives in {city}, and works as {a_job}.",
    "My neighbor {name} works as {a_job} in {city} and just turned {age}.",
    "At {age}, {name} is still working as {a_job} in {city}.",
    "{name} ({age}) has been {a_job} in {city} for years.",
    "Based in {city}, {name} is {a_job} who is {age} years old.",
    "{city} is home to {name}, {a_age} {job}.",
    "Say hello to {name}, {age}, who works as {a_job} in {city}.",
    "{name}, who is {age}, moved to {city} to work as {a_job}.",
    "I met {name} in {city}; {first} is {age} and works as {a_job}.",
    "The new {job} in {city} is {name}, aged {age}.",
]
HELDOUT_TEMPLATES = [
    "Last week I spoke with {name}, {a_age} {job} living in {city}.",
    "{name} celebrated turning {age} in {city}, where they work as {a_job}.",
    "Our records show {name} as {a_job}, age {age}, residing in {city}.",
]


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def make_contact(rng: random.Random, template: str, firsts: list[str], lasts: list[str]) -> dict:
    first, last = rng.choice(firsts), rng.choice(lasts)
    name, age, city, job = f"{first} {last}", rng.randint(18, 80), rng.choice(CITIES), rng.choice(JOBS)
    age_article = "an" if age in (18, 80) else "a"
    sentence = template.format(
        name=name, first=first, age=age, city=city, job=job,
        a_job=f"{article(job)} {job}", a_age=f"{age_article} {age}-year-old",
    )
    completion = json.dumps({"name": name, "age": age, "city": city, "job": job}, ensure_ascii=False)
    return {"prompt": f"Extract the contact as JSON: {sentence}", "completion": completion}


def make_contacts(rng: random.Random, count: int, templates: list[str], firsts: list[str], lasts: list[str]) -> list[dict]:
    examples: dict[str, dict] = {}
    while len(examples) < count:
        example = make_contact(rng, rng.choice(templates), firsts, lasts)
        examples.setdefault(example["prompt"], example)
    return list(examples.values())


# --- Alpaca sample -------------------------------------------------------------

ALPACA: list[tuple[str, str, str]] = [
    ("Translate the sentence to French.", "Good morning, how are you?", "Bonjour, comment allez-vous ?"),
    ("Translate the sentence to Spanish.", "Where is the train station?", "¿Dónde está la estación de tren?"),
    ("Summarize the text in one sentence.",
     "The city council voted on Tuesday to expand the bike lane network by 40 kilometers over the next three years. "
     "Supporters say the plan will reduce traffic and improve safety, while some business owners worry about losing parking spaces.",
     "The city council approved 40 km of new bike lanes over three years, a plan praised for safety and traffic benefits but "
     "criticized by some businesses over lost parking."),
    ("Classify the sentiment of the review as positive, negative, or neutral.", "The food was cold and the waiter ignored us.", "Negative"),
    ("Classify the sentiment of the review as positive, negative, or neutral.", "Absolutely loved the concert, best night of the year!", "Positive"),
    ("Classify the sentiment of the review as positive, negative, or neutral.", "The package arrived on Thursday.", "Neutral"),
    ("Give three tips for staying focused while studying.", "",
     "1. Put your phone in another room.\n2. Work in 25-minute blocks with short breaks.\n3. Keep a clear goal for each session."),
    ("Rewrite the sentence in the passive voice.", "The chef cooked the meal.", "The meal was cooked by the chef."),
    ("Correct the grammar of the sentence.", "She don't like apples and she go to school every days.",
     "She doesn't like apples, and she goes to school every day."),
    ("What is the capital of Germany?", "", "The capital of Germany is Berlin."),
    ("Write a haiku about autumn.", "", "Crisp leaves drift and fall\nGolden light on quiet paths\nThe year exhales slow"),
    ("Extract all email addresses from the text.", "Contact ana@example.com or support@shop.org for help.",
     "ana@example.com, support@shop.org"),
    ("Convert 5 kilometers to miles.", "", "5 kilometers is about 3.11 miles."),
    ("Sort the numbers in ascending order.", "42, 7, 19, 3, 88", "3, 7, 19, 42, 88"),
    ("Write a Python function that returns the square of a number.", "", "def square(x):\n    return x * x"),
    ("Explain what a noun is in one sentence.", "", "A noun is a word that names a person, place, thing, or idea."),
    ("Rewrite the message in a formal tone.", "Hey, can't make it tomorrow, sorry!",
     "I apologize, but I will be unable to attend tomorrow."),
    ("Give an antonym for the word.", "generous", "stingy"),
    ("Count the words in the sentence.", "The quick brown fox jumps over the lazy dog.", "9"),
    ("Classify the item as a fruit or a vegetable.", "carrot", "Vegetable"),
]


# --- Output ----------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    assert not set(PIRATE_HELDOUT) & {q for q, _ in QA}, "held-out question leaked into training QA"
    write_jsonl(HERE / "pirate.jsonl", make_pirate(rng))
    (HERE / "pirate_heldout.txt").write_text("".join(q + "\n" for q in PIRATE_HELDOUT), encoding="utf-8")
    write_jsonl(HERE / "contacts.jsonl", make_contacts(rng, 260, TRAIN_TEMPLATES, FIRST_NAMES, LAST_NAMES))
    write_jsonl(HERE / "contacts_heldout.jsonl", make_contacts(rng, 20, HELDOUT_TEMPLATES, HELDOUT_FIRST_NAMES, HELDOUT_LAST_NAMES))
    write_jsonl(HERE / "alpaca_sample.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in ALPACA])


if __name__ == "__main__":
    main()
