"""DeepSeek-V2 tensor names: DeepSeek-V3's MLA and MoE names, without the expert bias or MTP layers."""

from r1mega.bridge.rules import COMMON, Architecture
from r1mega.models.deepseek_v3.rules import MLA, MOE

ARCHITECTURE = Architecture(
    preset="deepseek_v2", model_type="deepseek_v2", hf_class="DeepseekV2ForCausalLM",
    rules=[*COMMON, *MLA, *MOE],
)
