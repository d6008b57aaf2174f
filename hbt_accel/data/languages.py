"""Language codes: the ISO 639-1 codes the repo accepts, and the spelled-out names some corpora use in file names
(mMARCO's `german_collection.tsv`, Mr. TyDi's `mrtydi-v1.1-swahili/`)."""

from __future__ import annotations

from hbt_accel.errors import DataError

# ISO 639-1 codes of the languages multilingual encoders commonly cover; an unknown code is almost always a typo.
LANGUAGE_NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian",
    "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "ga": "Irish", "gl": "Galician", "gu": "Gujarati",
    "ha": "Hausa", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "ig": "Igbo", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "jv": "Javanese",
    "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "ko": "Korean", "ku": "Kurdish",
    "ky": "Kyrgyz", "la": "Latin", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "my": "Burmese",
    "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "or": "Odia", "pa": "Punjabi", "pl": "Polish", "ps": "Pashto",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sa": "Sanskrit", "sd": "Sindhi", "si": "Sinhala",
    "sk": "Slovak", "sl": "Slovenian", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "su": "Sundanese",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "th": "Thai", "tl": "Tagalog", "tr": "Turkish",
    "ug": "Uyghur", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "xh": "Xhosa",
    "yi": "Yiddish", "yo": "Yoruba", "zh": "Chinese", "zu": "Zulu",
}  # fmt: skip

CODE_OF_NAME = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}


def validate_language(code: str, where: str) -> str:
    """Return `code` if it is a known ISO 639-1 code, else raise naming `where` it came from."""
    if code not in LANGUAGE_NAMES:
        raise DataError(f"{where}: unknown language code {code!r} (expected an ISO 639-1 code such as 'en', 'de')")
    return code


def language_code(code_or_name: str, where: str) -> str:
    """'de' or 'german' -> 'de'; anything else raises naming `where`."""
    value = code_or_name.strip().lower()
    if value in CODE_OF_NAME:
        return CODE_OF_NAME[value]
    return validate_language(value, where)
