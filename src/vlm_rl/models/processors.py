"""Processor workarounds: stock processors that need optional packages, rebuilt without them."""

from __future__ import annotations

from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without its video sub-processor.

    The stock processor builds a video processor that needs torchvision; where torchvision is not
    installed this image-only variant handles images identically. Used only when AutoProcessor fails
    for that reason (see `vlm_rl.models.loading.load_processor`), and for the tiny Qwen2.5-VL.
    """

    def __init__(
        self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs
    ):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # ProcessorMixin.__init__ checks every declared attribute; declare only these two.
        self.get_attributes = lambda: ["image_processor", "tokenizer"]
        super(Qwen2_5_VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict:
        # Saved as the stock class, so machines with torchvision load the stock processor.
        return {**super().to_dict(), "processor_class": "Qwen2_5_VLProcessor"}
