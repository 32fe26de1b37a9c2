"""The attribute tables: CelebA's 40 names (FaRL's output order) and the default controllable subset.

The one place these names are written; config validation, the classifier, the verbalizer and the shards read them
from here.
"""

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)

# A design decision (REFERENCE.md): the paper names age, hairstyle, expression, eyeglasses, smile and hair colour.
DEFAULT_CONTROLLABLE: tuple[str, ...] = (
    "Eyeglasses", "Smiling", "Young", "Bangs", "Blond_Hair", "Black_Hair", "Gray_Hair", "Wavy_Hair", "Bald",
    "Mouth_Slightly_Open", "Wearing_Hat", "Bushy_Eyebrows",
)

POSITIVE, NEGATIVE, UNKNOWN = "positive", "negative", "unknown"
# Flip directions: "add" makes a negative attribute present, "remove" makes a positive one absent.
ADD, REMOVE = "add", "remove"
