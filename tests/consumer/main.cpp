// Merges two one-tensor models with the installed cki and checks the result.
#include <cmath>
#include <iostream>

#include <cki/cki.hpp>

int main() {
  std::vector<cki::WeightSet<double>> models(2);
  for (int k = 0; k < 2; ++k) {
    cki::Tensor<double> weight({2});
    weight[0] = k;
    weight[1] = 1.0;
    models[k].add("w", std::move(weight));
  }
  const auto result = cki::splice(models, cki::CkiHard<double>());
  // Equal entropies and a shared deviation tie every element: the base wins.
  const bool ok = result.merged.view("w")[0] == 0.0 && result.report.method == "cki-hard";
  std::cout << (ok ? "consumer ok" : "consumer got a wrong merge") << "\n";
  return ok ? 0 : 1;
}
