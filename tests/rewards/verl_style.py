"""Reward functions in the shape verl documents for `custom_reward_function` (our own bodies):
`(data_source, solution_str, ground_truth, extra_info=None)` -> a float, or a dict with "score"."""
import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """GSM8K-style: the number after the last '####' must equal the ground truth."""
    found = re.findall(r"####\s*(-?[\d,.]+)", solution_str)
    if not found:
        return 0.0
    return 1.0 if found[-1].replace(",", "") == str(ground_truth) else 0.1


def score_with_details(data_source, solution_str, ground_truth, extra_info=None):
    """A dict return, with a string entry as verl's reward managers allow."""
    correct = solution_str.strip().endswith(str(ground_truth))
    bonus = 0.5 if data_source == "openai/gsm8k" else 0.0
    return {"score": float(correct) + bonus, "acc": correct, "pred": solution_str[-3:],
            "index": float(extra_info["index"]) if extra_info else -1.0}
