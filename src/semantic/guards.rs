//! Guards against look-alike questions: two messages a bi-encoder scores as near-identical
//! can ask opposite things ("turn on dark mode" / "turn off dark mode"), and no similarity
//! threshold separates those from paraphrases. A semantic hit must also pass every check
//! here; each compares a cheap, explainable fact about the two texts:
//!
//! - numbers and quantities (digits, and number words up to the thousands) are the same;
//! - both or neither are negated (not, never, without, don't, ... in several languages);
//! - no word on one side is the opposite of a word on the other (on/off, buy/sell, ...);
//! - names (capitalised words inside a sentence) of one side appear in the other.
//!
//! The lists are deliberately conservative: a refused paraphrase costs one generation,
//! a served look-alike gives a wrong answer.

use std::collections::HashSet;
use std::fmt;

/// Why a guard refused a semantic hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Numbers { cached: String, asked: String },
    Negation,
    Opposites { cached: String, asked: String },
    Names { missing: String },
}

impl Refusal {
    /// The metric label of this guard.
    pub fn guard(&self) -> &'static str {
        match self {
            Refusal::Numbers { .. } => "numbers",
            Refusal::Negation => "negation",
            Refusal::Opposites { .. } => "opposites",
            Refusal::Names { .. } => "names",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Numbers { cached, asked } => {
                write!(f, "numbers differ: [{cached}] cached, [{asked}] asked")
            }
            Refusal::Negation => write!(f, "one message is negated and the other is not"),
            Refusal::Opposites { cached, asked } => {
                write!(f, "opposite words: `{cached}` cached, `{asked}` asked")
            }
            Refusal::Names { missing } => write!(f, "the name `{missing}` is not in both"),
        }
    }
}

/// The facts the guards compare, extracted once per text.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    /// Numbers as normalised strings, in the order they appear ("from 5 to 10" is not
    /// "from 10 to 5").
    numbers: Vec<String>,
    negated: bool,
    /// Lower-cased words.
    words: HashSet<String>,
    /// Lower-cased capitalised words found inside a sentence.
    names: Vec<String>,
}

impl Signature {
    pub fn of(text: &str) -> Self {
        let mut numbers = Vec::new();
        let mut words = HashSet::new();
        // Arithmetic operators are words too: "7+2" is not "7-2".
        let chars: Vec<char> = text.chars().collect();
        for (at, c) in chars.iter().enumerate() {
            let between_digits = |at: usize| {
                let before = chars[..at].iter().rev().find(|c| !c.is_whitespace());
                let after = chars[at + 1..].iter().find(|c| !c.is_whitespace());
                before.is_some_and(char::is_ascii_digit) && after.is_some_and(char::is_ascii_digit)
            };
            let operator = match c {
                '+' => Some("plus"),
                '*' | '×' => Some("times"),
                '÷' => Some("divided"),
                '/' if between_digits(at) => Some("divided"),
                '-' | '−' if between_digits(at) => Some("minus"),
                '^' => Some("power"),
                '%' => Some("percent"),
                _ => None,
            };
            if let Some(operator) = operator {
                words.insert(operator.to_owned());
            }
        }
        let mut names = Vec::new();
        let mut negated = false;
        let mut sentence_start = true;
        for raw in text.split_whitespace() {
            // "don't" and "can't" keep their apostrophe for the negation list; other
            // punctuation separates ("firefox's" -> "firefox", "s").
            let ends_sentence = raw.ends_with(['.', '?', '!', ':', ';']);
            for token in raw
                .split(|c: char| {
                    !(c.is_alphanumeric() || matches!(c, '\'' | '’' | '.' | '-' | '°'))
                })
                .filter(|t| !t.is_empty())
            {
                // "-5" is not "5": a minus sign before a digit belongs to the number.
                let negative =
                    token.starts_with('-') && token[1..].starts_with(|c: char| c.is_ascii_digit());
                let token = token.trim_matches(|c| matches!(c, '\'' | '’' | '.' | '-'));
                if token.is_empty() {
                    continue;
                }
                let lower = token.to_lowercase().replace('’', "'");
                // "350°f" is a number and a unit; "two-factor" and "non-toxic" hold a
                // number and a negation in their parts.
                if let Some((digits, unit)) = lower.split_once('°') {
                    words.insert(format!("°{unit}"));
                    if let Some(number) = number_of(digits) {
                        numbers.push(number);
                    }
                } else {
                    for (index, part) in lower.split('-').filter(|p| !p.is_empty()).enumerate() {
                        // "5km" and "10gb": a number with its unit attached.
                        let suffix_at = part.find(|c: char| c.is_alphabetic()).filter(|&i| {
                            i > 0 && part[..i].chars().all(|c| c.is_ascii_digit() || c == '.')
                        });
                        let (number_part, unit) = match suffix_at {
                            Some(i) => (&part[..i], Some(&part[i..])),
                            None => (part, None),
                        };
                        if let Some(unit) = unit {
                            words.insert(unit.to_owned());
                        }
                        if let Some(number) = number_of(number_part) {
                            numbers.push(if negative && index == 0 {
                                format!("-{number}")
                            } else {
                                number
                            });
                        }
                        negated |= is_negation(part);
                    }
                }
                let capitalised = token.chars().next().is_some_and(char::is_uppercase)
                    && token.chars().skip(1).any(char::is_lowercase);
                let common = COMMON_CAPITALISED.contains(&lower.as_str()) || is_unit(&lower);
                if capitalised && !sentence_start && !common {
                    names.push(folded(&lower));
                }
                for part in lower.split(['\'', '.', '-', '°']) {
                    if !part.is_empty() {
                        words.insert(part.to_owned());
                    }
                }
                // "Node.js" and "nodejs", "México" and "mexico" name the same thing.
                words.insert(folded(&lower));
                words.insert(lower);
                sentence_start = false;
            }
            if ends_sentence {
                sentence_start = true;
            }
        }
        Self {
            numbers,
            negated,
            words,
            names,
        }
    }

    /// `None` when `asked` may be answered with the reply cached for `self`.
    pub fn refuses(&self, asked: &Signature) -> Option<Refusal> {
        // "a pound" and "1 lb" ask the same: a 1 on one side counts for nothing when the
        // other side says "a" or "an".
        let counted = |n: &[String], other: &Signature| -> Vec<String> {
            let article = other.words.contains("a") || other.words.contains("an");
            n.iter()
                .filter(|k| !(article && k.as_str() == "1"))
                .cloned()
                .collect()
        };
        if counted(&self.numbers, asked) != counted(&asked.numbers, self) {
            return Some(Refusal::Numbers {
                cached: self.numbers.join(", "),
                asked: asked.numbers.join(", "),
            });
        }
        if self.negated != asked.negated {
            return Some(Refusal::Negation);
        }
        for (a, b) in OPPOSITES {
            if let Some((mine, theirs)) = swapped(&self.words, &asked.words, &[a, b]) {
                return Some(Refusal::Opposites {
                    cached: mine.to_owned(),
                    asked: theirs.to_owned(),
                });
            }
        }
        for group in EXCLUSIVE {
            if let Some((mine, theirs)) = swapped(&self.words, &asked.words, group) {
                return Some(Refusal::Opposites {
                    cached: mine.to_owned(),
                    asked: theirs.to_owned(),
                });
            }
        }
        if let Some((mine, theirs)) = swapped_unit(&self.words, &asked.words) {
            return Some(Refusal::Numbers {
                cached: mine.to_owned(),
                asked: theirs.to_owned(),
            });
        }
        let missing = |from: &Signature, other: &Signature| {
            // A plural names the same thing ("PDFs" / "pdf").
            from.names
                .iter()
                .find(|name| {
                    !other.words.contains(name.as_str())
                        && !other.words.contains(name.trim_end_matches('s'))
                })
                .cloned()
        };
        if let Some(missing) = missing(self, asked).or_else(|| missing(asked, self)) {
            return Some(Refusal::Names { missing });
        }
        None
    }
}

/// A word of `group` only `mine` has, and another word of it only `theirs` has: one
/// side's word was swapped for another of the same kind.
fn swapped<'g>(
    mine: &HashSet<String>,
    theirs: &HashSet<String>,
    group: &[&'g str],
) -> Option<(&'g str, &'g str)> {
    let only = |a: &HashSet<String>, b: &HashSet<String>| {
        group
            .iter()
            .copied()
            .find(|w| a.contains(*w) && !b.contains(*w))
    };
    Some((only(mine, theirs)?, only(theirs, mine)?))
}

/// Lower-cased `word` without punctuation and with Latin accents removed.
fn folded(word: &str) -> String {
    word.chars()
        .filter(|c| c.is_alphanumeric())
        .map(|c| match c {
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' => 'a',
            'è' | 'é' | 'ê' | 'ë' => 'e',
            'ì' | 'í' | 'î' | 'ï' => 'i',
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' => 'o',
            'ù' | 'ú' | 'û' | 'ü' => 'u',
            'ñ' => 'n',
            'ç' => 'c',
            other => other,
        })
        .collect()
}

/// Words of one kind where asking about one is not asking about another: the
/// interrogatives that fix what is asked, axes, dimensions, parts of a pair.
const EXCLUSIVE: &[&[&str]] = &[
    &["plus", "minus", "times", "divided", "power"],
    &["who", "when", "where", "why"],
    &["horizontally", "vertically"],
    &["horizontal", "vertical"],
    &["row", "column"],
    &["rows", "columns"],
    &["key", "value"],
    &["keys", "values"],
    &["width", "height", "depth", "length"],
    &["population", "area", "height", "age", "size", "weight"],
    &["price", "cost", "duration"],
    &["symptoms", "causes", "treatment", "treatments"],
    &["meaning", "origin", "pronunciation", "spelling", "plural"],
    &["list", "tuple", "array"],
    &["breakfast", "lunch", "dinner"],
    &[
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ],
    &[
        "january",
        "february",
        "april",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    ],
    &["spring", "summer", "autumn", "fall", "winter"],
];

/// Units by kind, each with its spellings: a unit swapped for another of its kind is a
/// changed quantity ("5 miles" / "5 km"), a spelling swapped for another is not.
const UNITS: &[&[&[&str]]] = &[
    &[
        &["cup", "cups"],
        &["tablespoon", "tablespoons", "tbsp"],
        &["teaspoon", "teaspoons", "tsp"],
        &["gram", "grams"],
        &["kilogram", "kilograms", "kg", "kilo", "kilos"],
        &["pound", "pounds", "lb", "lbs"],
        &["ounce", "ounces", "oz"],
        &["liter", "liters", "litre", "litres", "l"],
        &[
            "milliliter",
            "milliliters",
            "millilitre",
            "millilitres",
            "ml",
        ],
        &["gallon", "gallons"],
        &["pint", "pints"],
    ],
    &[
        &["mile", "miles", "mi"],
        &["kilometer", "kilometers", "kilometre", "kilometres", "km"],
        &["meter", "meters", "metre", "metres"],
        &["foot", "feet", "ft"],
        &["inch", "inches", "in"],
        &["yard", "yards"],
        &[
            "centimeter",
            "centimeters",
            "centimetre",
            "centimetres",
            "cm",
        ],
    ],
    &[
        &["seconds", "secs", "sec"],
        &["minute", "minutes", "mins", "min"],
        &["hour", "hours", "hrs", "hr"],
        &["day", "days"],
        &["week", "weeks"],
        &["month", "months"],
        &["year", "years"],
    ],
    &[&["celsius", "°c"], &["fahrenheit", "°f"], &["kelvin", "°k"]],
    &[
        &["dollar", "dollars", "usd"],
        &["euro", "euros", "eur"],
        &["yen", "jpy"],
    ],
    &[&["kb"], &["mb"], &["gb"], &["tb"]],
];

fn is_unit(word: &str) -> bool {
    UNITS
        .iter()
        .flat_map(|kind| kind.iter())
        .any(|spellings| spellings.contains(&word))
}

/// The first unit of a kind one side names and the other does not, when the other names
/// another unit of that kind.
fn swapped_unit(
    mine: &HashSet<String>,
    theirs: &HashSet<String>,
) -> Option<(&'static str, &'static str)> {
    for kind in UNITS {
        let named = |words: &HashSet<String>| {
            kind.iter()
                .enumerate()
                .filter(|(_, spellings)| spellings.iter().any(|s| words.contains(*s)))
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        let (a, b) = (named(mine), named(theirs));
        let only_a = a.iter().find(|i| !b.contains(i));
        let only_b = b.iter().find(|i| !a.contains(i));
        if let (Some(&x), Some(&y)) = (only_a, only_b) {
            return Some((kind[x][0], kind[y][0]));
        }
    }
    None
}

/// Capitalised inside a sentence without being a name.
const COMMON_CAPITALISED: &[&str] = &["i", "i'm", "i've", "i'd", "i'll", "ok", "okay"];

fn is_negation(word: &str) -> bool {
    const NEGATIONS: &[&str] = &[
        // English
        "not", "no", "never", "without", "none", "nothing", "nobody", "neither", "nor", "cannot",
        "n't", // French
        "ne", "pas", "jamais", "sans", "aucun", "aucune", "rien", // German
        "nicht", "kein", "keine", "keinen", "keiner", "ohne", "nie", "niemals",
        // Spanish, Italian, Portuguese
        "nunca", "sin", "ningún", "ninguna", "senza", "mai", "non", "não", "nem", "sem",
    ];
    NEGATIONS.contains(&word) || word.ends_with("n't")
}

/// Word pairs whose swap flips what is asked. Each side is one lower-cased word.
const OPPOSITES: &[(&str, &str)] = &[
    ("on", "off"),
    ("enable", "disable"),
    ("enabled", "disabled"),
    ("enabling", "disabling"),
    ("activate", "deactivate"),
    ("increase", "decrease"),
    ("increasing", "decreasing"),
    ("raise", "lower"),
    ("up", "down"),
    ("before", "after"),
    ("min", "max"),
    ("minimum", "maximum"),
    ("minimize", "maximize"),
    ("smallest", "largest"),
    ("lowest", "highest"),
    ("buy", "sell"),
    ("buying", "selling"),
    ("upload", "download"),
    ("import", "export"),
    ("encrypt", "decrypt"),
    ("encode", "decode"),
    ("compress", "decompress"),
    ("add", "remove"),
    ("insert", "delete"),
    ("start", "stop"),
    ("open", "close"),
    ("win", "lose"),
    ("hot", "cold"),
    ("first", "last"),
    ("above", "below"),
    ("push", "pull"),
    ("allow", "block"),
    ("allow", "deny"),
    ("install", "uninstall"),
    ("ascending", "descending"),
    ("asc", "desc"),
    ("in", "out"),
    ("input", "output"),
    ("inner", "outer"),
    ("left", "right"),
    ("true", "false"),
    ("yes", "no"),
    ("more", "less"),
    ("most", "least"),
    ("better", "worse"),
    ("best", "worst"),
    ("fast", "slow"),
    ("faster", "slower"),
    ("early", "late"),
    ("earlier", "later"),
    ("gain", "lose"),
    ("lock", "unlock"),
    ("mute", "unmute"),
    ("show", "hide"),
    ("connect", "disconnect"),
    ("subscribe", "unsubscribe"),
    ("follow", "unfollow"),
    ("zip", "unzip"),
    ("send", "receive"),
    ("lend", "borrow"),
    ("borrowing", "lending"),
    ("debit", "credit"),
    ("inhale", "exhale"),
    ("positive", "negative"),
    ("north", "south"),
    ("east", "west"),
    ("male", "female"),
    ("men", "women"),
    ("legal", "illegal"),
    ("safe", "unsafe"),
    ("healthy", "unhealthy"),
    ("visible", "invisible"),
    ("public", "private"),
    ("accept", "reject"),
    ("include", "exclude"),
    ("expand", "collapse"),
    ("merge", "split"),
    ("love", "hate"),
    ("like", "dislike"),
    ("pros", "cons"),
    ("advantages", "disadvantages"),
    ("benefits", "risks"),
    ("cheap", "expensive"),
    ("light", "dark"),
    ("long", "short"),
    ("big", "small"),
    ("large", "small"),
    ("high", "low"),
    ("new", "old"),
    ("young", "old"),
    ("arrive", "depart"),
    ("arrival", "departure"),
    ("arrivals", "departures"),
    ("come", "go"),
    ("enter", "exit"),
    ("inside", "outside"),
    ("internal", "external"),
    ("heat", "cool"),
    ("heating", "cooling"),
    ("warm", "cool"),
    ("hottest", "coldest"),
    ("warmest", "coolest"),
    ("increase", "reduce"),
    ("increase", "lower"),
    ("raise", "reduce"),
    ("higher", "lower"),
    ("bigger", "smaller"),
    ("larger", "smaller"),
    ("longer", "shorter"),
    ("older", "newer"),
    ("oldest", "newest"),
    ("cheaper", "pricier"),
    ("cheapest", "priciest"),
    ("strong", "weak"),
    ("stronger", "weaker"),
    ("heavy", "light"),
    ("thick", "thin"),
    ("wide", "narrow"),
    ("deep", "shallow"),
    ("full", "empty"),
    ("wet", "dry"),
    ("rich", "poor"),
    ("success", "failure"),
    ("pass", "fail"),
    ("succeed", "fail"),
    ("win", "loss"),
    ("profit", "loss"),
    ("gain", "loss"),
    ("importing", "exporting"),
    ("uploading", "downloading"),
    ("attach", "detach"),
    ("mount", "unmount"),
    ("freeze", "unfreeze"),
    ("pin", "unpin"),
    ("block", "unblock"),
    ("archive", "unarchive"),
    ("hide", "unhide"),
    ("pause", "resume"),
    ("begin", "end"),
    ("start", "end"),
    ("starting", "stopping"),
    ("before", "during"),
    ("during", "after"),
    ("past", "future"),
    ("yesterday", "tomorrow"),
    ("morning", "evening"),
    ("day", "night"),
    ("sunrise", "sunset"),
    ("give", "take"),
    ("giving", "taking"),
    ("forward", "backward"),
    ("forwards", "backwards"),
    ("front", "back"),
    ("top", "bottom"),
    ("upper", "lower"),
    ("upstairs", "downstairs"),
    ("uppercase", "lowercase"),
    ("accept", "decline"),
    ("approve", "reject"),
    ("agree", "disagree"),
    ("include", "omit"),
    ("maximum", "min"),
    ("max", "minimum"),
    ("online", "offline"),
    ("sync", "async"),
    ("synchronous", "asynchronous"),
    ("client", "server"),
    ("frontend", "backend"),
    ("encryption", "decryption"),
    ("serialize", "deserialize"),
    ("compile", "decompile"),
    ("plus", "minus"),
    ("multiply", "divide"),
    ("add", "subtract"),
    ("sum", "difference"),
    ("always", "sometimes"),
    ("everyone", "nobody"),
    ("all", "some"),
    ("many", "few"),
    ("mostly", "rarely"),
    ("often", "rarely"),
    ("quickly", "slowly"),
    ("easy", "hard"),
    ("easiest", "hardest"),
    ("simple", "complex"),
    ("cause", "prevent"),
    ("causes", "prevents"),
    ("help", "hurt"),
    ("benefit", "risk"),
    ("allowed", "forbidden"),
    ("legal", "banned"),
    ("correct", "incorrect"),
    ("valid", "invalid"),
    // French, German, Spanish, Italian
    ("monter", "baisser"),
    ("augmenter", "diminuer"),
    ("ouvrir", "fermer"),
    ("entrée", "sortie"),
    ("arrivée", "départ"),
    ("erhöhen", "senken"),
    ("öffnen", "schließen"),
    ("ankunft", "abfahrt"),
    ("subir", "bajar"),
    ("subo", "bajo"),
    ("sube", "baja"),
    ("aumentar", "disminuir"),
    ("abrir", "cerrar"),
    ("llegada", "salida"),
    ("alzare", "abbassare"),
    ("aprire", "chiudere"),
    ("aumentare", "diminuire"),
    ("arrivo", "partenza"),
    ("activer", "désactiver"),
    ("acheter", "vendre"),
    ("avant", "après"),
    ("einschalten", "ausschalten"),
    ("aktivieren", "deaktivieren"),
    ("kaufen", "verkaufen"),
    ("vor", "nach"),
    ("activar", "desactivar"),
    ("comprar", "vender"),
    ("antes", "después"),
    ("encender", "apagar"),
    ("allumer", "éteindre"),
];

/// A number in `word`, normalised ("7", "7.5", "1000"), or `None`.
fn number_of(word: &str) -> Option<String> {
    let digits = word.trim_end_matches('%');
    if digits.chars().any(|c| c.is_ascii_digit()) {
        // "3.0" and "3" are the same quantity; "v2" and "2nd" keep their digits.
        let cleaned: String = digits
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        return Some(match cleaned.parse::<f64>() {
            Ok(value) if cleaned.contains('.') => format!("{value}"),
            _ => cleaned.trim_start_matches('0').to_owned(),
        })
        .map(|n| if n.is_empty() { "0".into() } else { n });
    }
    const WORDS: &[(&str, u32)] = &[
        ("zero", 0),
        ("one", 1),
        ("two", 2),
        ("three", 3),
        ("four", 4),
        ("five", 5),
        ("six", 6),
        ("seven", 7),
        ("eight", 8),
        ("nine", 9),
        ("ten", 10),
        ("eleven", 11),
        ("twelve", 12),
        ("thirteen", 13),
        ("fourteen", 14),
        ("fifteen", 15),
        ("sixteen", 16),
        ("seventeen", 17),
        ("eighteen", 18),
        ("nineteen", 19),
        ("twenty", 20),
        ("thirty", 30),
        ("forty", 40),
        ("fifty", 50),
        ("sixty", 60),
        ("seventy", 70),
        ("eighty", 80),
        ("ninety", 90),
        ("hundred", 100),
        ("thousand", 1000),
        ("million", 1_000_000),
        ("billion", 1_000_000_000),
        ("dozen", 12),
        ("half", 0),
        ("double", 0),
        ("twice", 2),
        ("once", 1),
        ("thrice", 3),
        // French, German, Spanish: the small ones that questions use most.
        ("deux", 2),
        ("trois", 3),
        ("quatre", 4),
        ("cinq", 5),
        ("zwei", 2),
        ("drei", 3),
        ("vier", 4),
        ("fünf", 5),
        ("zehn", 10),
        ("dos", 2),
        ("tres", 3),
        ("cuatro", 4),
        ("cinco", 5),
        ("diez", 10),
    ];
    let (_, value) = WORDS.iter().find(|(w, _)| *w == word)?;
    // "half" and "double" are quantities without a digit form: keep the word.
    Some(if *value == 0 && word != "zero" {
        word.to_owned()
    } else {
        value.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(cached: &str, asked: &str) -> Option<&'static str> {
        Signature::of(cached)
            .refuses(&Signature::of(asked))
            .map(|r| r.guard())
    }

    #[test]
    fn paraphrases_pass_every_guard() {
        for (a, b) in [
            (
                "How do I turn on dark mode in Firefox?",
                "how can i enable firefox's dark theme",
            ),
            ("Add 2 cups of flour?", "add two cups of flour"),
            ("What is 15% of 80?", "what's 15 % of 80"),
            ("I can't log in to Gmail", "I cannot log into Gmail"),
            ("Who wrote Hamlet?", "who is the author of hamlet"),
        ] {
            assert_eq!(refusal(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn look_alikes_are_refused_by_the_right_guard() {
        for (a, b, guard) in [
            (
                "How do I turn on dark mode?",
                "How do I turn off dark mode?",
                "opposites",
            ),
            (
                "which foods are safe for dogs",
                "which foods are not safe for dogs",
                "negation",
            ),
            ("convert 5 miles to km", "convert 50 miles to km", "numbers"),
            (
                "a recipe with three eggs",
                "a recipe with four eggs",
                "numbers",
            ),
            (
                "What is the capital of Austria?",
                "What is the capital of Australia?",
                "names",
            ),
            (
                "sort the list ascending",
                "sort the list descending",
                "opposites",
            ),
            (
                "should I buy Tesla stock",
                "should I sell Tesla stock",
                "opposites",
            ),
        ] {
            assert_eq!(refusal(a, b), Some(guard), "{a} / {b}");
        }
    }

    #[test]
    fn order_signs_operators_and_attached_units_count() {
        assert_eq!(
            refusal("list numbers from 5 to 10", "list numbers from 10 to 5"),
            Some("numbers")
        );
        assert_eq!(
            refusal("what is -5 squared", "what is 5 squared"),
            Some("numbers")
        );
        assert_eq!(refusal("what is 7+2", "what is 7-2"), Some("opposites"));
        assert_eq!(
            refusal("is 5km a long run", "is 5 miles a long run"),
            Some("numbers")
        );
        assert_eq!(
            refusal("1/4 cup of flour in grams", "4 cups of flour in grams"),
            Some("numbers")
        );
        assert_eq!(
            refusal("how many ounces are in a pound", "how many oz in 1 lb"),
            None
        );
        assert_eq!(
            refusal("a well-known x-ray fact", "a well-known x-ray fact"),
            None
        );
    }

    #[test]
    fn decimals_and_leading_zeros_are_the_same_number() {
        assert_eq!(refusal("set it to 3.50", "set it to 3.5"), None);
        assert_eq!(refusal("room 007", "room 7"), None);
        assert_eq!(refusal("python 2", "python 3"), Some("numbers"));
    }
}
