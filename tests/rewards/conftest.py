import sys
from pathlib import Path

# Lets config strings such as "reward_plugins:boom" and "test_rubric:KeywordJudge" resolve.
sys.path.insert(0, str(Path(__file__).parent))
