# src/defectvad/models/winclip/prompting.py
# WinCLIP's compositional prompt ensemble: every state word in every template, as anomalib 2.7 writes them
# (the jpeg template appears twice there, and so here, since the ensemble is averaged)
NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]

ANOMALOUS_STATES = [
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
]

TEMPLATES = [
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
]

# anomalib's word when nothing names the object
DEFAULT_OBJECT = "object"

# readable object words for the benchmark categories (model.object_words=true; MVTec AD, VisA, BTAD share no
# category name); anomalib itself puts the category's folder name into the prompts unchanged. BTAD's products
# are only numbered, so they stay anomalib's unnamed object.
OBJECT_WORDS = {
    "metal_nut": "metal nut",
    "chewinggum": "chewing gum",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
    "01": DEFAULT_OBJECT,
    "02": DEFAULT_OBJECT,
    "03": DEFAULT_OBJECT,
}


def create_prompt_ensemble(class_name=DEFAULT_OBJECT):
    # (normal prompts, anomalous prompts): states outer, templates inner
    normal = [template.format(state.format(class_name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(class_name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal, anomalous


def object_word(category, readable=False):
    # the category as the prompts name it: as anomalib does (the folder name), or its readable word
    if category is None:
        return DEFAULT_OBJECT
    category = str(category)
    return OBJECT_WORDS.get(category, category.replace("_", " ")) if readable else category
