"""The transformers classes an HF export of a non-native megamoe model ships (trust_remote_code=True).

These two files are copied into the export folder; transformers imports them from there. They
import megamoe itself, so the model runs megamoe's own code: `pip install megamoe` where it is loaded.
"""
