# src/defectvad/backbones/tokenizer.py
# CLIP's byte-pair tokenizer with open_clip's SimpleTokenizer semantics. ftfy's repairs are left out: for plain
# prompts the cleaning is NFC, html unescape (twice), whitespace folding and lower case.
import gzip
import html
import unicodedata

import torch

from defectvad.backbones.registry import BPE_VOCAB
from defectvad.backbones.weights import backbone_folder, file_sha256
from defectvad.errors import BackboneError

START = "<start_of_text>"
END = "<end_of_text>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77


def bytes_to_unicode():
    # every byte gets a printable character; bytes that are printable map to themselves
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clean_text(text):
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def char_kind(char):
    if char.isspace():
        return "space"
    category = unicodedata.category(char)[0]
    return {"L": "letter", "N": "number"}.get(category, "other")


def split_words(text):
    # the pattern <start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+
    words, i = [], 0
    while i < len(text):
        fixed = next((w for w in (START, END) + CONTRACTIONS if text.startswith(w, i)), None)
        if fixed:
            words.append(fixed)
            i += len(fixed)
            continue
        kind = char_kind(text[i])
        j = i + 1
        if kind in ("letter", "other"):
            while j < len(text) and char_kind(text[j]) == kind:
                j += 1
        if kind != "space":
            words.append(text[i:j])
        i = j
    return words


def read_merges(path, limit=MERGES):
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError):
        raise BackboneError(f"{path} is not a readable gzip file of CLIP byte-pair merges; copy it again") from None
    # the first line is a version header
    return [tuple(line.split()) for line in lines[1:limit + 1] if line.strip()]


class ClipTokenizer:
    def __init__(self, vocab_path, context_length=CONTEXT_LENGTH):
        self.byte_encoder = bytes_to_unicode()
        # no vocabulary file: bytes only, no merges (for random weights, where the ids carry no meaning)
        merges = [] if vocab_path is None else read_merges(vocab_path)
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.start_id = self.encoder[START]
        self.end_id = self.encoder[END]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.cache = {START: [START], END: [END]}

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text):
        ids = []
        for word in split_words(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(word))
        return ids

    def __call__(self, texts, context_length=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        result = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id] + self.encode(text) + [self.end_id]
            if len(ids) > length:
                ids = ids[:length - 1] + [self.end_id]
            result[row, :len(ids)] = torch.tensor(ids)
        return result


def load_tokenizer(backbone_dir=None, context_length=CONTEXT_LENGTH):
    # the merges file lives in the backbone folder like a weight file, checked against its sha256
    folder = backbone_folder(backbone_dir)
    path = folder / BPE_VOCAB["file"]
    if not path.is_file():
        raise BackboneError(f"CLIP tokenizer vocabulary {BPE_VOCAB['file']} not found in {folder}; on a machine that "
                            f"is online fetch {BPE_VOCAB['url']}, then copy it into that folder")
    if file_sha256(path) != BPE_VOCAB["sha256"]:
        raise BackboneError(f"{path} hash does not match the CLIP vocabulary's; fetch it again from {BPE_VOCAB['url']}")
    return ClipTokenizer(path, context_length)
